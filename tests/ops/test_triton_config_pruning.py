"""kernels/sparsekit_kernels/_config.prune_oversized: the autotuned kernels compile and time only the
Hopper configs whose tiles fit the problem (a tiny GEMM took 50-109 s on an H200 tuning all eight),
every config when the problem is training-sized, and never none."""
import pytest
import triton

from sparsekit.kernels import gemm, sparse
from sparsekit.kernels._config import prune_oversized


def hopper(entries: list[dict]) -> list:
    """The GPU config list of a kernel (the interpreter's autotuners hold one small config instead)."""
    return [triton.Config({k: v for k, v in entry.items() if not k.startswith("num_")}) for entry in entries]


def tiles(configs, *blocks):
    return sorted(tuple(c.kwargs[b] for b in blocks) for c in configs)


def test_a_tiny_gemm_keeps_only_the_smallest_tile():
    kept = prune_oversized(BLOCK_M="M", BLOCK_N="N")(hopper(gemm._HOPPER), {"M": 13, "N": 29, "K": 11})
    assert tiles(kept, "BLOCK_M", "BLOCK_N") == [(64, 64)]


def test_a_training_sized_gemm_keeps_every_config():
    configs = hopper(gemm._HOPPER)
    kept = prune_oversized(BLOCK_M="M", BLOCK_N="N")(configs, {"M": 4096, "N": 32768, "K": 768})
    assert kept == configs


def test_tiles_may_reach_the_next_power_of_two_of_the_size():
    kept = prune_oversized(BLOCK_M="M", BLOCK_N="N")(hopper(gemm._HOPPER), {"M": 100, "N": 300, "K": 64})
    assert tiles(kept, "BLOCK_M", "BLOCK_N") == [(64, 64), (64, 128), (64, 256), (128, 64), (128, 128),
                                                  (128, 128), (128, 256)]


@pytest.mark.parametrize("sizes", [{"S": 2, "D": 11}, {"S": 1, "D": 1}, {"S": 0, "D": 0}])
def test_when_no_config_fits_the_smallest_tile_stays(sizes):
    configs = hopper(sparse._SEGMENT_HOPPER)
    kept = prune_oversized(BLOCK_S="S", BLOCK_D="D")(configs, sizes)
    # no config has BLOCK_S <= 2 and BLOCK_D <= 128 (the list's smallest BLOCK_D) at these sizes
    assert all(c.kwargs["BLOCK_S"] > 2 or c.kwargs["BLOCK_D"] > 128 for c in configs)
    assert len(kept) == 1
    assert kept[0].kwargs["BLOCK_S"] * kept[0].kwargs["BLOCK_D"] == min(
        c.kwargs["BLOCK_S"] * c.kwargs["BLOCK_D"] for c in configs)


@pytest.mark.parametrize("kernel", [gemm._gemm_kernel, sparse._segment_sum_kernel, sparse._scatter_add_kernel],
                         ids=lambda k: k.base_fn.__name__ if hasattr(k, "base_fn") else str(k))
def test_every_autotuned_kernel_prunes(kernel):
    assert kernel.early_config_prune is not None


def autotune_keys(monkeypatch, autotuner, launch) -> list:
    """The key each launch of ``autotuner`` tunes under (its key names' values, as Triton's Autotuner
    reads them from the launch's arguments), for the launches ``launch()`` makes."""
    seen, run = [], autotuner.run

    def recording_run(*args, **kwargs):
        named = dict(zip(autotuner.arg_names, args), **kwargs)
        seen.append(tuple(named[name] for name in autotuner.keys))
        return run(*args, **kwargs)

    monkeypatch.setattr(autotuner, "run", recording_run)
    launch()
    return seen


def test_gemms_of_sizes_within_a_power_of_two_share_one_autotune_key(monkeypatch):
    import torch
    a, b = torch.randn(200, 24), torch.randn(24, 40)
    keys = autotune_keys(monkeypatch, gemm._gemm_kernel,
                         lambda: [gemm.gemm(a[:rows], b) for rows in (65, 100, 120, 129)])
    assert keys[0] == keys[1] == keys[2] != keys[3]  # 65..128 share the bucket 128; 129 starts the next


def test_a_transposed_operand_tunes_under_its_own_key(monkeypatch):
    import torch
    a, b = torch.randn(32, 24), torch.randn(40, 24)
    keys = autotune_keys(monkeypatch, gemm._gemm_kernel, lambda: [gemm.gemm(a, b.t()), gemm.gemm(a, b.t().contiguous())])
    assert keys[0] != keys[1]


def test_autotune_keys_name_no_exact_size():
    for kernel in (gemm._gemm_kernel, sparse._segment_sum_kernel, sparse._scatter_add_kernel):
        assert not {"M", "N", "K", "S", "D", "E"} & set(kernel.keys), kernel.keys
