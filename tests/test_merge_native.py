"""The native merge kernel: bitwise equal to the torch reference (``MergeRecipe.apply`` then ``.to(dtype)``)
for every dtype pair and recipe kind, on random data and special values; and its build cache."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from c2f_megatron.merge import native
from c2f_megatron.merge.math import ChunkedMerger, evaluate, pin_nans
from c2f_megatron.merge.recipe import MergeRecipe

ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = list(ST)
# Sizes that are no multiple of any vector width (4/8/16 floats) nor of the kernel's 512-element block.
SIZES = (1, 15, 513, 1031)

F32_SPECIALS = [
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA00000, 0xFFC01234,  # NaNs: quiet, signalling, payloads
    0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x00400000,  # subnormals, smallest normal
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # max finite; ties that round to inf or not
    0x3F808000, 0x3F818000, 0xBF818000, 0x3F807FFF, 0x3F808001,  # bf16 ties (to even) and neighbours
    0x00008000, 0x00018000, 0x80008000,  # bf16 ties among subnormals
    0x3F801000, 0x3F803000, 0x477FF000, 0x477FEFFF, 0x33800000, 0x33000000, 0x33000001,  # fp16 ties, overflow, subnormals
]  # fmt: skip
U16_SPECIALS = [
    0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x8001, 0x007F, 0x7F7F, 0xFF7F,  # bf16
    0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x03FF, 0x0400, 0x7BFF, 0xFBFF,  # fp16 inf, NaN, subnormal, max
]  # fmt: skip


def _bits_to(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.tensor(values, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return torch.tensor([v - 0x10000 if v >= 0x8000 else v for v in values], dtype=torch.int16).view(dtype)


def make_input(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random normals (various scales), random bit patterns (every class of value), and the specials, at
    random positions and in the last elements (the kernel's tail loop)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float())).to(
        dtype
    )
    raw_bits = 32 if dtype == torch.float32 else 16
    raw = torch.randint(0, 2**raw_bits, (n,), generator=g, dtype=torch.int64)
    pick = torch.rand(n, generator=g) < 0.25
    x[pick] = _bits_to(raw[pick].tolist(), dtype)
    specials = _bits_to(F32_SPECIALS if dtype == torch.float32 else U16_SPECIALS, dtype)
    k = min(n, len(specials))
    x[torch.randperm(n, generator=g)[:k]] = specials[torch.randperm(len(specials), generator=g)[:k]]
    x[-min(n, 5) :] = specials[:5][: min(n, 5)]
    return x


def reference(recipe: MergeRecipe, xs: list[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """The documented result: torch's fp32 formula, one ``.to(dtype)``, NaNs written canonically."""
    y = evaluate(recipe, xs).to(out_dtype)
    pin_nans(y)
    return y


def run_native(
    recipes: list[MergeRecipe], xs: list[torch.Tensor], out_dtype: torch.dtype
) -> list[torch.Tensor]:
    n = xs[0].numel()
    ys = [torch.full((n,), 123.0, dtype=out_dtype) for _ in recipes]
    native.NativeMerger(recipes).merge(
        [x.data_ptr() for x in xs], ST[xs[0].dtype], [y.data_ptr() for y in ys], ST[out_dtype], n
    )
    return ys


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    gi, wi = got.view(INT_VIEW[got.dtype]), want.view(INT_VIEW[want.dtype])
    bad = (gi != wi).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        mask = 0xFFFFFFFF if got.dtype == torch.float32 else 0xFFFF
        raise AssertionError(
            f"{what}: {len(bad)} elements differ; first at {i}: got {int(gi[i]) & mask:#x}, "
            f"want {int(wi[i]) & mask:#x}"
        )


RECIPE_SETS = {
    # One pass for a whole sweep: several outputs from the same read.
    "linear": [MergeRecipe("weighted", (g, 1.0 - g)) for g in (0.0, 1.0, 0.7, 0.1, 0.3)],
    "nway3": [MergeRecipe("weighted", (0.5, 0.3, 0.2)), MergeRecipe("weighted", (1 / 3, -2.5, 7.0))],
    "nway4": [MergeRecipe("weighted", (0.1, 0.2, 0.3, 0.4))],
    "task": [MergeRecipe("task", (g,)) for g in (0.6, 0.0, 1.0, 0.1)],
}


@pytest.mark.parametrize("recipes", list(RECIPE_SETS), ids=list(RECIPE_SETS))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=[ST[d] for d in DTYPES])
@pytest.mark.parametrize("in_dtype", DTYPES, ids=[ST[d] for d in DTYPES])
def test_kernel_is_bitwise_the_torch_reference(in_dtype, out_dtype, recipes):
    rs = RECIPE_SETS[recipes]
    for n in SIZES:
        xs = [make_input(n, in_dtype, seed=100 * n + i) for i in range(rs[0].num_inputs)]
        for recipe, got in zip(rs, run_native(rs, xs, out_dtype)):
            assert_bitwise(got, reference(recipe, xs, out_dtype), f"{recipe} n={n}")


def test_torch_chunked_merger_writes_the_same_bytes():
    """The fallback (torch) and the kernel agree, NaNs included, through the raw-buffer interface."""
    rs = RECIPE_SETS["linear"]
    n = 5000
    xs = [make_input(n, torch.bfloat16, seed=s) for s in (1, 2)]
    ins = [bytearray(x.view(torch.uint8).numpy().tobytes()) for x in xs]
    outs = [bytearray(2 * n) for _ in rs]
    ChunkedMerger(rs, chunk=512).merge_buffers(ins, "BF16", outs, "BF16", n)
    for got, want in zip(outs, run_native(rs, xs, torch.bfloat16)):
        assert bytes(got) == want.view(torch.uint8).numpy().tobytes()


def test_data_tells_the_rounding_choices_apart():
    """The bitwise test can fail: on this data, a weight kept in double, a fused multiply-add, or a rounding
    to bf16 by truncation give other bits than the reference."""
    a, b = (make_input(4096, torch.bfloat16, seed=s) for s in (7, 8))
    fa, fb = a.float(), b.float()
    want = reference(MergeRecipe("weighted", (0.7, 0.3)), [a, b], torch.bfloat16)
    finite = torch.isfinite(fa) & torch.isfinite(fb)
    weight_in_double = (0.7 * fa.double() + 0.3 * fb.double()).float()
    w0, w1 = torch.tensor(0.7).float().double(), torch.tensor(0.3).float().double()
    fused = ((w0 * fa.double()).float().double() + w1 * fb.double()).float()  # second product not rounded
    ref32 = evaluate(MergeRecipe("weighted", (0.7, 0.3)), [a, b])
    assert not torch.equal(weight_in_double[finite], ref32[finite])
    assert not torch.equal(fused[finite], ref32[finite])
    truncated = (ref32.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert not torch.equal(truncated[finite].view(torch.int16), want[finite].view(torch.int16))


def test_python_float_weight_is_rounded_to_fp32_first_by_torch():
    """The kernel takes fp32 weights because torch does: ``w * x`` for an fp32 tensor multiplies by
    ``float(w)``, which differs from rounding the double product ``w * x`` for some x."""
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 6 - 3
    w = 0.7
    w32 = torch.tensor(w, dtype=torch.float32).double()
    float_first = (w32 * x.double()).float()  # exact product of two floats, rounded once: fp32 mul
    double_first = (w * x.double()).float()
    assert not torch.equal(float_first, double_first)
    assert torch.equal(w * x, float_first)


def test_fp32_to_bf16_rounding_is_c10_round_to_nearest_even():
    """torch's ``.to(bfloat16)`` of non-NaN values is c10's formula ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``
    (its NaN bits vary with the CPU's vector unit, hence the canonical NaN)."""
    u = make_input(100_000, torch.float32, seed=3).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    f = (u.to(torch.int32)).view(torch.float32)
    keep = ~torch.isnan(f)
    c10 = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    got = f.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(got[keep], c10[keep])
    nan_out = run_native([MergeRecipe("weighted", (1.0,))], [f[~keep]], torch.bfloat16)[0]
    assert set((nan_out.view(torch.int16).to(torch.int64) & 0xFFFF).tolist()) == {0x7FC0}


def test_unsupported_dtypes_are_reported_not_guessed():
    merger = native.NativeMerger([MergeRecipe("weighted", (0.5, 0.5))])
    assert merger.supports("BF16", "F32") and not merger.supports("F64", "F32")
    with pytest.raises(ValueError, match="F64"):
        merger.merge([0, 0], "F64", [0], "F32", 1)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        merger.merge([0], "BF16", [0], "F32", 1)


def test_build_cache_is_keyed_atomic_and_safe_for_concurrent_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # One vector variant only: this test is about the cache, and a small build is quick.
    monkeypatch.setattr(native, "CFLAGS", (*native.CFLAGS, "-DC2F_NO_CLONES"))
    monkeypatch.setattr(native, "_loaded", {})
    with ThreadPoolExecutor(3) as pool:  # three ranks building the same library at once
        libs = list(pool.map(lambda _: native.load_library(), range(3)))
    assert all(lib.c2f_abi_version() == native.ABI_VERSION for lib in libs)
    built = sorted(p.name for p in (tmp_path / "cache" / "c2f_megatron").iterdir())
    assert len(built) == 1 and built[0].startswith("merge_kernel-") and built[0].endswith(".so"), built
    compiler = native.find_compiler()
    assert compiler is not None
    path = native.library_path(compiler)
    assert path.name == built[0]
    monkeypatch.setattr(native, "CFLAGS", (*native.CFLAGS, "-g"))
    assert native.library_path(compiler) != path  # other flags, other file
    monkeypatch.setattr(native, "CFLAGS", native.CFLAGS[:-1])
    # A damaged entry (e.g. a copy killed half-way) is rebuilt, not loaded; in a fresh process, since
    # this one has the library mapped (and the dynamic loader would hand back the loaded one by name).
    path.unlink()
    path.write_bytes(b"not a shared object")
    code = (
        "from c2f_megatron.merge import native; native.CFLAGS += ('-DC2F_NO_CLONES',); "
        "print(native.load_library().c2f_abi_version())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.stdout.strip() == str(native.ABI_VERSION), proc.stderr
    assert path.stat().st_size > 1000


def test_without_compiler_the_merge_falls_back_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_notified", set())
    from c2f_megatron.merge.engine import BufferMerger

    rs = RECIPE_SETS["linear"]
    merger = BufferMerger(rs)
    merger2 = BufferMerger(rs)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-cc" in err and "torch" in err
    xs = [make_input(300, torch.bfloat16, seed=s) for s in (4, 5)]
    ins = [bytearray(x.view(torch.uint8).numpy().tobytes()) for x in xs]
    outs = [bytearray(4 * 300) for _ in rs]
    merger.merge(ins, "BF16", outs, "F32", 300)
    merger.close()
    merger2.close()
    assert merger.used == {"torch"}
    for recipe, got in zip(rs, outs):
        want = reference(recipe, xs, torch.float32)
        assert bytes(got) == want.view(torch.uint8).numpy().tobytes()
    assert not (tmp_path / "cache" / "c2f_megatron").exists() or not list(
        (tmp_path / "cache" / "c2f_megatron").glob("*.so")
    )
    # A compiler that fails: the same one-line notice, naming it, and no half-built file left behind.
    monkeypatch.setenv("CC", "false")
    BufferMerger(rs).close()
    err = capsys.readouterr().err
    assert "false failed on" in err and "kernel.c" in err and "torch" in err
    assert not list((tmp_path / "cache" / "c2f_megatron").iterdir())


def test_fused_build_would_fail_the_bitwise_test(tmp_path, monkeypatch):
    """Why -ffp-contract=off: the same kernel built with contraction on an FMA unit gives other bits."""
    if not {"fma", "avx2", "f16c"} <= _cpu_flags():
        pytest.skip("no FMA unit: contraction cannot change the results here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    flags = [("-ffp-contract=fast" if f == "-ffp-contract=off" else f) for f in native.CFLAGS]
    monkeypatch.setattr(native, "CFLAGS", (*flags, "-DC2F_NO_CLONES", "-march=x86-64-v3"))
    fused = native.NativeMerger(RECIPE_SETS["linear"], lib=native.load_library())
    xs = [make_input(4096, torch.float32, seed=s) for s in (9, 10)]
    ys = [torch.empty(4096) for _ in RECIPE_SETS["linear"]]
    fused.merge([x.data_ptr() for x in xs], "F32", [y.data_ptr() for y in ys], "F32", 4096)
    want = reference(RECIPE_SETS["linear"][2], xs, torch.float32)
    assert not torch.equal(ys[2].view(torch.int32), want.view(torch.int32))


def _cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else ""
    return set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )


# Each runtime variant of the x86-64 library, built alone (the machine runs only the widest it supports).
VARIANTS = {
    "sse2": ("-march=x86-64", set()),
    "avx2": ("-march=x86-64-v3", {"avx2", "fma", "f16c"}),
    "avx512": ("-march=x86-64-v4", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_vector_variant_is_bitwise_the_reference(variant, tmp_path, monkeypatch):
    march, needs = VARIANTS[variant]
    flags = _cpu_flags()
    if "sse2" not in flags or not needs <= flags:
        pytest.skip(f"this CPU cannot run the {variant} variant")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "CFLAGS", (*native.CFLAGS, "-DC2F_NO_CLONES", march))
    lib = native.load_library()
    for name, rs in RECIPE_SETS.items():
        for in_dtype in DTYPES:
            xs = [make_input(1031, in_dtype, seed=7 + i) for i in range(rs[0].num_inputs)]
            for out_dtype in DTYPES:
                ys = [torch.empty(1031, dtype=out_dtype) for _ in rs]
                native.NativeMerger(rs, lib=lib).merge(
                    [x.data_ptr() for x in xs], ST[in_dtype], [y.data_ptr() for y in ys], ST[out_dtype], 1031
                )
                for recipe, got in zip(rs, ys):
                    assert_bitwise(got, reference(recipe, xs, out_dtype), f"{variant} {name} {recipe}")
