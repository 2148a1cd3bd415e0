"""plstar.distributed on 2 and 3 gloo processes agrees with one process, and fails together.

The processes are real: this file is also the worker script (``python test_distributed.py RANK
WORLD STORE OUT``), joined through a FileStore; each group computes everything, saves it, then
loses a rank. Oracles are computed here, in one process: plstar.tangent_kernel and a dense jacrev
kernel, both float64, and plstar.spectrum.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ZOO, dense_kernel
from conftest import run_cli as run
from torch import Tensor, nn

import plstar

HERE = Path(__file__).resolve()
TIMEOUT = 60  # seconds: the default groups' timeout (the failure scenario uses a 3 s subgroup)


def prelu_case() -> tuple[nn.Module, Tensor]:
    """A PReLU (no structured rule) between two Linear layers: structured with fallback rows.
    11 samples keep every shard away from c = k = 2 samples, where torch 2.13's vmap of PReLU's
    backward returns wrong Jacobian rows in one process too (see the report to the lead)."""
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 16), nn.PReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.double().eval(), torch.randn(11, 4, generator=g, dtype=torch.float64)


def case(name: str) -> tuple[nn.Module, Tensor]:
    """Every zoo model (as the zoo fixture builds it) and the PReLU model, deterministic."""
    if name == "prelu-k2":
        return prelu_case()
    torch.manual_seed(0)
    model, x = ZOO[name](torch.Generator().manual_seed(1))
    return model.double().eval(), (x.double() if x.is_floating_point() else x)


CASES = [*sorted(ZOO), "prelu-k2"]
RUNS = [(name, "auto") for name in CASES] + [
    ("prelu-k2", "jacobian"),  # the Jacobian fallback path, chosen explicitly
    ("prelu-k2", "structured"),  # structured features with fallback rows
    ("mlp-relu-k3", "jacobian"),
    ("mlp-relu-k3", "structured"),  # structured features without fallback rows
    ("embedding-k2", "structured"),  # integer token ids travel beside the float features
    ("cnn-k3", "structured"),  # Grams over positions, where "auto" takes the Jacobian
]
# Lanczos in lockstep costs a collective per step: a few runs suffice to show it runs unchanged
LANCZOS = [("mlp-relu-k3", "auto"), ("prelu-k2", "auto"), ("embedding-k2", "structured")]


# ----------------------------------------------------------------------------- the worker side


def _agree_scenario(rank: int, world: int, out: Path) -> None:
    from plstar import distributed as D

    results: dict = {}
    for name, implementation in RUNS:
        model, x = case(name)
        kernel = D.tangent_kernel(model, x, implementation=implementation)
        v = torch.randn(
            kernel.shape[0], 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
        light = D.tangent_kernel(model, x, implementation=implementation, store="features")
        results[name, implementation] = {
            "K": kernel.gather(),
            "Kv": kernel @ v,
            "dense": D.spectrum(kernel).to_dict(),
            "used": kernel.implementation,
            "Kv from features": light @ v,
        }
        if (name, implementation) in LANCZOS:
            results[name, implementation]["lanczos"] = D.spectrum(kernel, method="lanczos")
            results[name, implementation]["spectrum from features"] = D.spectrum(light)
    # this rank's own shard only, of uneven sizes chosen here rather than by shard_sizes
    model, x = case("mlp-relu-k3")
    sizes = [1, 5] if world == 2 else [3, 1, 2]
    start = sum(sizes[:rank])
    kernel = D.tangent_kernel(model, x[start : start + sizes[rank]], sharded=True)
    results["sharded"] = {"K": kernel.gather(), "counts": kernel.counts}
    # an input error on the last rank only must reach every rank
    bad = x.clone()
    if rank == world - 1:
        bad[0, 0] = float("nan")
    results["nan on last rank"] = _error_of(lambda: D.tangent_kernel(model, bad))
    # a rank with other weights is refused instead of mixing two models
    if rank == world - 1:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    results["other weights"] = _error_of(lambda: D.tangent_kernel(model, x))
    D.broadcast_parameters(model)
    results["after broadcast"] = D.tangent_kernel(model, x).gather()
    torch.save(results, out / f"rank{rank}.pt")


def _error_of(fn: Callable[[], object]) -> dict:
    from plstar.distributed import DistributedError

    try:
        fn()
    except DistributedError as error:
        return {"message": str(error), "input_error": error.input_error}
    return {"message": None}


def _failure_scenario(rank: int, world: int, out: Path) -> None:
    """The last rank dies (SIGKILL, on 3 ranks) or hangs (on 2) after the ring's first exchange;
    the others must fail on their own, through the broken connection or the 3-second timeout of
    the group they compute in, and record the error."""
    from datetime import timedelta

    import torch.distributed as dist

    from plstar import distributed as D
    from plstar import distributed_comm

    unpack = distributed_comm.unpack

    def sabotaged(*args: object, **kwargs: object) -> object:
        if rank == world - 1:
            if world == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(6)
        return unpack(*args, **kwargs)

    distributed_comm.unpack = sabotaged
    group = dist.new_group(timeout=timedelta(seconds=3))  # init's own timeout is longer
    model, x = case("mlp-relu-k3")
    failure = _error_of(lambda: D.tangent_kernel(model, x, group=group))
    (out / f"failure{rank}.json").write_text(json.dumps(failure))


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    from plstar import distributed as D

    D.init("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    _agree_scenario(rank, world, Path(out))
    _failure_scenario(rank, world, Path(out))
    os._exit(0)  # the group is broken: skip its teardown


# ----------------------------------------------------------------------------- the test side


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SMALL = ["--n", "30", "--width", "24", "--depth", "2", "--hessian-outputs", "3"]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(procs: list[subprocess.Popen], limit: float) -> list[tuple[int, str, str]]:
    """(return code, stdout, stderr) per process; kills what still runs after ``limit`` seconds."""
    deadline, results = time.monotonic() + limit, []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Everything that needs processes, started at once (most of it waits on imports):
    the worker groups of 2 and 3 ranks, and ``plstar analyze --distributed`` under torchrun."""
    tmp = tmp_path_factory.mktemp("distributed")
    groups = {}
    for world in (2, 3):
        (tmp / f"ranks-{world}").mkdir()
        groups[world] = [
            _start([sys.executable, str(HERE), str(r), str(world), str(tmp / f"store-{world}"),
                    str(tmp / f"ranks-{world}")])
            for r in range(world)
        ]  # fmt: skip
    torchrun = _start([
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "--", "plstar", "analyze", "--distributed", "--timeout", str(TIMEOUT), *SMALL,
        "--json", str(tmp / "distributed.json"),
    ])  # fmt: skip
    out: dict = {"ranks": {}}
    for world, procs in groups.items():
        # bounded: a rank left hanging is killed, and its missing results fail the tests
        for rank, (code, _, err) in enumerate(_wait(procs, 240)):
            killed = world == 3 and rank == world - 1
            assert code == (-signal.SIGKILL if killed else 0), err[-3000:]
        folder = tmp / f"ranks-{world}"
        out["ranks"][world] = [
            {
                **torch.load(folder / f"rank{r}.pt", weights_only=False),
                "failure": json.loads((folder / f"failure{r}.json").read_text())
                if (folder / f"failure{r}.json").exists() else None,
            }
            for r in range(world)
        ]  # fmt: skip
    [(code, stdout, stderr)] = _wait([torchrun], 240)
    out["torchrun"] = {
        "code": code,
        "stdout": stdout,
        "stderr": stderr,
        "json": tmp / "distributed.json",
    }
    return out


@pytest.fixture(scope="module")
def ranks(runs: dict) -> dict[int, list[dict]]:
    """Per world size (2, 3), each rank's results of the worker."""
    return runs["ranks"]


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("name", "implementation"), RUNS)
def test_distributed_kernel_and_spectrum_equal_one_process(
    ranks: dict, world: int, name: str, implementation: str
) -> None:
    model, x = case(name)
    reference = plstar.tangent_kernel(model, x, implementation=implementation)  # type: ignore[arg-type]
    root = ranks[world][0][name, implementation]
    assert torch.equal(root["K"], root["K"].T)  # mirrored by construction, whatever the GEMM did
    assert _relative(root["K"], reference) <= 1e-12
    assert _relative(root["K"], dense_kernel(model, x)) <= 1e-12
    if implementation != "auto":  # the explicit paths, structured with and without fallback rows
        assert root["used"] == implementation
    else:  # "auto" chooses by cost on each shard: on tiny shards the Jacobian rows may cost less
        assert root["used"] in ("structured", "jacobian")
    exact = plstar.spectrum(reference)
    v = torch.randn(
        reference.shape[0], 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    for rank, results in enumerate(ranks[world]):
        mine = results[name, implementation]
        # replicated by an all-reduce in which every entry has one non-zero term: exact
        for key in ("Kv", "Kv from features"):
            assert torch.equal(mine[key], root[key]), f"rank {rank}'s {key} differs from rank 0's"
            assert _relative(mine[key], reference @ v) <= 1e-12, key
        for key in ("dense", "lanczos", "spectrum from features"):  # broadcast from rank 0
            assert mine.get(key) == root.get(key), f"rank {rank}'s {key} differs from rank 0's"
    dense = root["dense"]
    # λ_min to 1e-12 relative, or to the precision floor when K is too ill-conditioned for that
    assert abs(dense["lambda_min_raw"] - exact.lambda_min) <= max(
        1e-12 * abs(exact.lambda_min), exact.precision_floor
    )
    assert dense["lambda_max"] == pytest.approx(exact.lambda_max, rel=1e-12)
    assert dense["precision_floor"] == pytest.approx(exact.precision_floor, rel=1e-12)
    assert dense["is_singular"] == exact.is_singular and dense["method"] == exact.method


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("name", "implementation"), LANCZOS)
def test_lanczos_runs_unchanged_on_the_distributed_products(
    ranks: dict, world: int, name: str, implementation: str
) -> None:
    model, x = case(name)
    reference = plstar.tangent_kernel(model, x, implementation=implementation)  # type: ignore[arg-type]
    exact, single = plstar.spectrum(reference), plstar.spectrum(reference, method="lanczos")
    for key in ("lanczos", "spectrum from features"):  # stored rows, and products from features
        found = ranks[world][0][name, implementation][key]
        assert found.method == single.method
        assert found.lambda_max == pytest.approx(single.lambda_max, rel=1e-12)
        assert found.lambda_min == pytest.approx(single.lambda_min, rel=1e-10)
        assert abs(found.lambda_min - exact.lambda_min) <= found.lambda_min_error


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_user_shards_and_failures_on_one_rank_reach_every_rank(
    ranks: dict, world: int
) -> None:
    model, x = case("mlp-relu-k3")
    reference = plstar.tangent_kernel(model, x)
    root = ranks[world][0]
    assert root["sharded"]["counts"] == ([1, 5] if world == 2 else [3, 1, 2])
    assert _relative(root["sharded"]["K"], reference) <= 1e-12
    for rank, mine in enumerate(ranks[world]):
        nan = mine["nan on last rank"]
        assert f"rank {world - 1} failed" in nan["message"] and "non-finite" in nan["message"]
        assert nan["input_error"], rank
        other = mine["other weights"]
        assert "different parameters" in other["message"] and other["input_error"]
    assert _relative(root["after broadcast"], reference) <= 1e-12


@pytest.mark.parametrize(("world", "how"), [(2, "hangs"), (3, "dies")])
def test_a_rank_that_dies_or_hangs_ends_the_run_with_an_error_on_the_others(
    ranks: dict, world: int, how: str
) -> None:
    for rank in range(world - 1):
        failure = ranks[world][rank]["failure"]
        assert "lost contact" in failure["message"], (how, rank, failure)
    if how == "hangs":  # it wakes up alone and fails as well
        assert "lost contact" in ranks[world][-1]["failure"]["message"]


def test_analyze_under_torchrun_prints_once_and_matches_one_process(
    runs: dict, tmp_path: Path
) -> None:
    done = runs["torchrun"]
    assert done["code"] == 0, done["stderr"][-3000:]
    assert done["stdout"].count("plstar analyze") == 1 and done["stdout"].count("λ_min(K)") == 1
    data = json.loads(done["json"].read_text())
    assert data["config"]["distributed"] == {"ranks": 2, "backend": "gloo", "store": "rows"}
    assert run(["analyze", *SMALL, "--json", str(tmp_path / "b.json")]) == 0
    single = json.loads((tmp_path / "b.json").read_text())["analysis"]
    analysis = data["analysis"]
    assert analysis["kernel"]["lambda_min"] == pytest.approx(
        single["kernel"]["lambda_min"], rel=1e-12
    )
    assert analysis["kernel"]["precision_floor"] == pytest.approx(
        single["kernel"]["precision_floor"], rel=1e-12
    )
    for key in ("loss0", "pl_ratio", "mu", "kappa"):
        assert analysis[key] == pytest.approx(single[key], rel=1e-10), key
    assert analysis["beta"]["value"] == pytest.approx(single["beta"]["value"], rel=1e-8)


def test_distributed_without_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert run(["analyze", "--distributed", "--n", "8"]) == 2
    assert "torchrun" in capsys.readouterr().err


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
