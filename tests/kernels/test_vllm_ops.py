"""vLLM 0.26.0's Hopper kernels (kernels/vllm_ops.py): the re-encodings exactly on CPU, the refusals and the
tuner rows everywhere, each kernel against the dequantized reference where the library and a Hopper GPU are."""

import pytest
import torch

from colquant.kernels import autotune, vllm_ops
from colquant.kernels.copies import prepare_vllm, vllm_repacks
from colquant.kernels.linear import W4A16Linear
from colquant.kernels.packing import unpack_int4_rows
from e4m3_rounding import round_e4m3

# ScalarType.id of these types as vllm 0.26.0's vllm/scalar_type.py computes them (read off that file)
VLLM_0_26_IDS = {"uint4b8": 1125899907892224, "int4": 1125899906908928, "uint4": 1125899906843648,
                 "float8_e4m3fn": 2814749767172868}


def _signed_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words [R, N] packed along R -> signed int4 values [8R, N]."""
    u = unpack_int4_rows(words).to(torch.int16)
    return torch.where(u >= 8, u - 16, u)


# ------------------------------------------------------------------ re-encodings (exact, CPU)


def test_scalar_type_ids_match_vllm():
    assert vllm_ops.UINT4B8_ID == VLLM_0_26_IDS["uint4b8"]
    assert vllm_ops.INT4_ID == VLLM_0_26_IDS["int4"]
    assert vllm_ops.scalar_type_id(0, 4, False, 0) == VLLM_0_26_IDS["uint4"]
    assert vllm_ops.scalar_type_id(4, 3, True, 0, finite_only=True, nan_repr=2) == VLLM_0_26_IDS["float8_e4m3fn"]


def test_uint4b8_to_int4_is_q_minus_8_per_nibble():
    torch.manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (64, 48), dtype=torch.int32)
    got = _signed_nibbles(vllm_ops.uint4b8_to_int4(words))
    want = unpack_int4_rows(words).to(torch.int16) - 8
    assert torch.equal(got, want)


def test_uint4b8_to_int4_refuses_other_dtypes():
    with pytest.raises(ValueError, match="int32 words"):
        vllm_ops.uint4b8_to_int4(torch.zeros(4, 4, dtype=torch.int64))


def test_fp8_group_scales_reconstruct_the_scales():
    torch.manual_seed(1)
    scales = (torch.randn(20, 256) * 1e-3).to(torch.float16)
    scales[:, 7] = 0  # an all-zero column
    fp8, chan = vllm_ops.fp8_group_scales(scales)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == scales.shape
    assert chan.dtype == torch.float32 and chan.shape == (256, 1)
    s, f, c = scales.double(), fp8.double(), chan.double().t()
    amax = s.abs().amax(0)
    live = amax > 0
    # channel scale: the column's largest |scale| / 56, so |int4 * group scale| <= 8 * 56 = 448 stays finite in e4m3
    assert torch.equal(c[0, live], (amax[live].float() / 56).double())
    assert float(f.abs().max()) <= 56 and torch.equal(f.abs().amax(0)[live], torch.full((int(live.sum()),), 56.0,
                                                                                          dtype=torch.float64))
    assert c[0, 7] == 1 and torch.equal(f[:, 7], torch.zeros(20, dtype=torch.float64))
    # one e4m3 rounding: <= 2^-4 relative for normal values, half the subnormal step (2^-10) absolute below
    err = (f * c - s).abs()
    bound = torch.maximum(s.abs() * 2**-4, c * 2**-10) * (1 + 1e-6)
    assert bool((err <= bound).all())
    assert torch.equal(torch.sign(f), torch.sign(s))  # negative scales (auto-round's sign rule) keep their sign


def test_fp8_group_scales_are_one_round_to_nearest_even_of_scale_over_channel():
    torch.manual_seed(3)
    scales = (torch.randn(24, 384) * 1e-3).to(torch.float16)
    scales[3, :5] = 0  # zero groups in live columns
    scales[5:9] *= 2e-4  # tiny groups: their quotients land among e4m3's subnormals (below 2^-6)
    fp8, chan = vllm_ops.fp8_group_scales(scales)
    assert bool(((fp8.float().abs() < 2**-6) & (fp8.float() != 0)).any())
    quotient = (scales.float() / chan.t()).clamp(-56, 56)  # fp32 division, as specified; |q * s| <= 8 * 56 = 448
    assert torch.equal(fp8.double(), round_e4m3(quotient))


def test_w4a8_reencoding_dequantizes_to_the_w4a16_weight():
    torch.manual_seed(2)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 128, bias=False))
    qweight, _, scales = lin.to_gptq()
    q = _signed_nibbles(vllm_ops.uint4b8_to_int4(qweight)).double()  # [K, N]
    fp8, chan = vllm_ops.fp8_group_scales(scales)
    w = q * (fp8.double() * chan.double().t()).repeat_interleave(lin.group_size, 0)
    ref = lin.dequantize(torch.float64).t()
    assert torch.equal(q, (unpack_int4_rows(qweight).to(torch.int16) - 8).double())  # integers exact
    assert ((w - ref).norm() / ref.norm()).item() < 2**-4  # scales: one e4m3 rounding each


def test_marlin_scales_permute_within_64_columns():
    s = torch.arange(3 * 128, dtype=torch.float32).reshape(3, 128)
    got = vllm_ops.marlin_scales(s)
    order = vllm_ops.marlin_scale_order()
    assert sorted(order.tolist()) == list(range(64))
    for block in range(2):
        assert torch.equal(got[:, 64 * block:64 * block + 64], s[:, 64 * block + order].to(torch.bfloat16))


def test_layer_unsupported_reasons():
    assert "asymmetric" in vllm_ops.layer_unsupported_reason(2560, 9728, 128, False, "machete")
    assert vllm_ops.layer_unsupported_reason(2560, 9728, 128, True, "machete") is None
    assert "N % 128" in vllm_ops.layer_unsupported_reason(2560, 64, 128, True, "machete")
    assert "group size 128" in vllm_ops.layer_unsupported_reason(2560, 256, 64, True, "w4a8")
    assert "N % 64" in vllm_ops.layer_unsupported_reason(256, 96, 128, True, "marlin")


# ------------------------------------------------------------------ refusals (CPU)


@pytest.mark.parametrize("capability, refused", [((8, 9), {"machete", "w4a8"}), ((10, 0), {"machete", "w4a8"}),
                                                 ((9, 0), set())])
def test_gpu_generation_is_checked(monkeypatch, capability, refused):
    monkeypatch.setattr(vllm_ops, "load_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    got = {kind for kind in vllm_ops.KINDS if vllm_ops.unavailable_reason("cuda:0", kind)}
    assert got == refused
    if refused:
        assert "Hopper" in vllm_ops.unavailable_reason("cuda:0", "machete")


# ------------------------------------------------------------------ tuner rows and the repack rule (CPU)


@pytest.mark.skipif(vllm_ops.load_error() is None, reason="the library is loaded here: the rows are offered")
def test_rows_are_skipped_with_the_reason_where_the_library_is_absent():
    skipped = autotune.unavailable_candidates("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("machete", "vllm-marlin", "cutlass-w4a8"):
        assert vllm_ops.load_error() in skipped[name]
    assert vllm_ops.machete_schedules() == ()


def test_candidate_rows():
    rows = {c.name: c for c in autotune.CANDIDATES}
    assert rows["machete"].kind == "machete" and rows["machete"].configs()[0] == {"schedule": None}
    assert rows["vllm-marlin"].kind == "marlin" and rows["vllm-marlin"].activations == "bf16"
    assert rows["cutlass-w4a8"].activations == "fp8" and rows["cutlass-w4a8"].max_rel_err == vllm_ops.W4A8_CHECK_REL_ERR


def _entry(bucket, name, kind, timed):
    return dict(K=256, N=128, G=128, M_bucket=bucket, kind=kind, name=name, cfg=None, timed_us=timed)


def test_repack_only_where_never_slower_than_the_layers_own_kernels():
    fast_everywhere = [_entry(16, "machete", "machete", {"machete": 5.0, "vllm-marlin": 6.0, "bc64x64-w2": 8.0}),
                       _entry(1024, "machete", "machete", {"machete": 50.0, "vllm-marlin": 90.0, "dequant+cublas": 51.0})]
    assert vllm_repacks(fast_everywhere) == {(256, 128): "machete"}
    slower_somewhere = [dict(e) for e in fast_everywhere]
    slower_somewhere[1]["timed_us"] = {"machete": 60.0, "vllm-marlin": 90.0, "dequant+cublas": 51.0}
    assert vllm_repacks(slower_somewhere) == {}
    below_min_tokens = [_entry(8, "machete", "machete", {"machete": 50.0, "bc64x64-w2": 8.0})] + fast_everywhere
    assert vllm_repacks(below_min_tokens) == {(256, 128): "machete"}  # no forward carries fewer than 16 tokens
    never_picked = [_entry(16, "bc64x64-w2", "triton", {"machete": 5.0, "bc64x64-w2": 5.0})]
    assert vllm_repacks(never_picked) == {}


def test_prepare_without_library_repacks_nothing():
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 128, bias=False))
    before = lin.weight_bytes
    info = prepare_vllm(torch.nn.Sequential(lin), [_entry(16, "machete", "machete", {"machete": 1.0, "bc64x64-w2": 2.0})])
    if vllm_ops.unavailable_reason(lin.compute_device, "machete"):
        assert info["prepared"] == 0 and info["skipped"] == 1 and info["reason"]
        assert lin.weight_bytes == before and not lin.spilled


# ------------------------------------------------------------------ the kernels (CUDA, library present)

CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def _needs(kind):
    why = vllm_ops.unavailable_reason(CUDA, kind) if CUDA is not None else "no CUDA"
    return pytest.mark.skipif(why is not None, reason=f"needs vLLM's {kind} here: {why}")


def _rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def _layer(k, n, seed=0, bias=False):
    torch.manual_seed(seed)
    return W4A16Linear.from_linear(torch.nn.Linear(k, n, bias=bias).to(CUDA, torch.bfloat16))


@pytest.mark.parametrize("kind", [pytest.param("machete", marks=_needs("machete")),
                                  pytest.param("marlin", marks=_needs("marlin"))])
@pytest.mark.parametrize("m", [1, 42, 336])
@pytest.mark.parametrize("act", [False, True])
def test_w4a16_kernel_matches_dequantized_reference(kind, m, act):
    k, n = 2560, 1024
    lin = _layer(k, n, m, bias=True)
    ref_w = lin.dequantize(torch.float32)
    own = lin.weight_bytes
    vllm_ops.prepare(lin, kind)
    assert lin.spilled and lin.qweight_k.device.type == "cpu"  # one 4-bit copy on the GPU: the repack
    assert lin.weight_bytes == lin._vllm.nbytes + lin.bias.numel() * 2 and lin.weight_bytes <= 1.1 * own
    x = torch.randn(m, 2 * k if act else k, device=CUDA, dtype=torch.bfloat16)
    a = (torch.nn.functional.silu(x[:, :k].float()) * x[:, k:].float()) if act else x.float()
    want = a @ ref_w.t() + lin.bias.float()
    got = lin.forward_act(x) if act else lin(x)
    assert _rel(got, want) < autotune.CHECK_REL_ERR
    vllm_ops.release(lin)
    assert not lin.spilled and lin._vllm is None and lin.qweight_k.device.type == "cuda"


@_needs("machete")
def test_every_machete_schedule_matches():
    lin = _layer(2560, 1024)
    h = vllm_ops.build_handle("machete", *lin.kernel_tensors(), lin.group_size)
    x = torch.randn(42, 2560, device=CUDA, dtype=torch.bfloat16)
    want = x.float() @ lin.dequantize(torch.float32).t()
    schedules = vllm_ops.machete_schedules()
    assert schedules
    bad = {s: e for s in schedules if (e := _rel(h(x, cfg={"schedule": s}), want)) > autotune.CHECK_REL_ERR}
    assert not bad


@_needs("w4a8")
@pytest.mark.parametrize("m", [1, 42, 1344])
def test_w4a8_matches_dequantized_reference(m):
    lin = _layer(2560, 1024, m)
    h = vllm_ops.build_handle("w4a8", *lin.kernel_tensors(), lin.group_size)
    x = torch.randn(m, 2560, device=CUDA, dtype=torch.bfloat16)
    want = x.float() @ lin.dequantize(torch.float32).t()
    err = _rel(h(x), want)
    assert err < vllm_ops.W4A8_CHECK_REL_ERR, err
    out = torch.full((m, 1024), float("nan"), device=CUDA, dtype=torch.bfloat16)
    assert _rel(h(vllm_ops._quantize_rows(x), out=out), want) == pytest.approx(err, rel=1e-3)  # pre-quantized pair


@_needs("machete")
def test_tuner_times_the_rows(monkeypatch):
    rows = [c for c in autotune.CANDIDATES if c.kind in ("machete", "marlin", "w4a8", "bf16")]
    monkeypatch.setattr(autotune, "CANDIDATES", tuple(rows))
    w4a16 = autotune.tune_shape(1024, 1024, 128, CUDA, ms=(1, 64))
    assert {"machete", "vllm-marlin", "bf16"} <= set(w4a16[0]["timed_us"])
    assert "cutlass-w4a8" not in w4a16[0]["timed_us"]
    assert all(e["kind"] != "machete" or "schedule" in e["cfg"] for e in w4a16)
    w4a8 = autotune.tune_shape(1024, 1024, 128, CUDA, ms=(64,), activations="fp8")
    assert set(w4a8[0]["timed_us"]) == {"cutlass-w4a8", "bf16"}


# ------------------------------------------------------------------ a repacked layer's dispatch (CPU)


class _RecordingRepack:
    """Stands in for a vllm_ops.Packed on CPU: records the config each call gets (the kernel is the library's)."""

    kind, nbytes = "machete", 0

    def __init__(self):
        self.cfgs = []

    def __call__(self, x, out=None, bias=None, cfg=None):
        self.cfgs.append(cfg)
        return torch.zeros(x.shape[0], 128, dtype=x.dtype)


def test_repacked_layer_runs_its_kernel_at_every_bucket(monkeypatch):
    from colquant.kernels import linear

    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16))
    lin._vllm = _RecordingRepack()
    table = {(256, 128, 64): ("machete", {"schedule": "s1", "fallback": ["triton", {}]}),
             (256, 128, 1024): ("triton", {"BM": 64}),
             (256, 128, 4096): ("bf16", {"fallback": ["machete", {"schedule": "s2"}]})}
    monkeypatch.setattr(linear.DISPATCH, "table", table)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    lin._run_vllm(x, act=False)
    lin._run_vllm(torch.randn(1000, 256, dtype=torch.bfloat16), act=False)
    lin._run_vllm(torch.randn(3000, 256, dtype=torch.bfloat16), act=False)  # bf16 picked, no copy held
    assert lin._vllm.cfgs == [{"schedule": "s1", "fallback": ["triton", {}]}, None, None]
    lin.keep_bf16_copy()
    got = lin._run_vllm(torch.randn(3000, 256, dtype=torch.bfloat16), act=False)
    assert len(lin._vllm.cfgs) == 3 and got.abs().sum() > 0  # the BF16 copy ran


def test_unrepacked_layer_falls_back_from_a_vllm_entry(monkeypatch):
    from colquant.kernels import linear

    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 128, bias=False))
    own = ("triton", {"BM": 16})
    monkeypatch.setattr(linear.DISPATCH, "table", {(256, 128, 64): ("machete", {"schedule": "s", "fallback": list(own)})})
    assert tuple(lin._resolve(40, "cpu")) == own
    assert not lin.has_copy("machete", None) and not lin.has_copy("marlin", None)
