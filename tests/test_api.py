"""The functional API: layouts, strided views without copies, out=, thread count, torch."""
import numpy as np
import pytest

import attngen
from attngen.reference import attention_reference

rng = np.random.default_rng(1)


def test_bshd_layout_and_out_argument():
    q = rng.standard_normal((2, 33, 6, 48)).astype(np.float32)
    k = rng.standard_normal((2, 40, 3, 48)).astype(np.float32)
    v = rng.standard_normal((2, 40, 3, 48)).astype(np.float32)
    out = np.full_like(q, np.nan)
    result = attngen.attention(q, k, v, causal=True, layout="bshd", out=out)
    assert result is out
    ref = attention_reference(q, k, v, causal=True, layout="bshd")
    assert np.abs(out - ref).max() < 1e-5


def test_strided_views_are_read_in_place():
    # q, k, v are slices of one packed QKV buffer [B, S, 3, H, D]: no copies needed.
    qkv = rng.standard_normal((2, 50, 3, 4, 32)).astype(np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.flags.c_contiguous
    out = attngen.attention(q, k, v, causal=True, layout="bshd")
    ref = attention_reference(q, k, v, causal=True, layout="bshd")
    assert np.abs(out - ref).max() < 1e-5


def test_read_only_inputs_and_offset_views():
    # Dense arrays are passed by address through the buffer protocol: a read-only array must
    # be accepted, and a dense slice must be read from its own first element, not its base's.
    q, k, v = (rng.standard_normal((3, 4, 24, 32)).astype(np.float32) for _ in range(3))
    for array in (q, k, v):
        array.flags.writeable = False
    q1, k1, v1 = q[1:], k[1:], v[1:]
    assert q1.flags.c_contiguous and q1.ctypes.data != q.ctypes.data
    out = np.empty((4, 4, 24, 32), np.float32)[2:]   # a writeable dense slice as out
    attngen.attention(q1, k1, v1, causal=True, out=out)
    assert np.abs(out - attention_reference(q1, k1, v1, causal=True)).max() < 1e-5
    decoded = attngen.attention(q1[:, :, -1:], k1, v1, causal=True)
    ref = attention_reference(q1[:, :, -1:], k1, v1, causal=True)
    assert np.abs(decoded - ref).max() < 1e-5


def test_scale_argument():
    q, k, v = (rng.standard_normal((1, 2, 20, 16)).astype(np.float32) for _ in range(3))
    out = attngen.attention(q, k, v, scale=0.3)
    assert np.abs(out - attention_reference(q, k, v, scale=0.3)).max() < 1e-5


def test_alibi_slopes_given_explicitly():
    q, k, v = (rng.standard_normal((1, 6, 20, 16)).astype(np.float32) for _ in range(3))
    slopes = np.linspace(0.1, 1.0, 6).astype(np.float32)
    out = attngen.attention(q, k, v, causal=True, alibi=slopes)
    ref = attention_reference(q, k, v, causal=True, alibi=slopes)
    assert np.abs(out - ref).max() < 1e-5


def test_kernel_lookup_follows_the_build_environment(monkeypatch):
    """A changed ATTNGEN_ISA (or compiler, flags, cache directory) takes effect at the next
    call, and changing it back finds the first kernel again."""
    spec = attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal")
    first = attngen.get_kernel(spec)
    assert attngen.get_kernel(spec) is first
    monkeypatch.setenv("ATTNGEN_ISA", "generic")
    fallback = attngen.get_kernel(spec)
    assert fallback is not first and "(generic, " in fallback.source.splitlines()[0]
    q = rng.standard_normal((1, 4, 20, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 20, 32)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(attngen.attention(q, k, v, causal=True),
                               attention_reference(q, k, v, causal=True), atol=1e-5)
    monkeypatch.delenv("ATTNGEN_ISA")
    assert attngen.get_kernel(spec) is first


def test_empty_batch():
    q = np.zeros((0, 2, 4, 16), np.float32)
    assert attngen.attention(q, q, q).shape == (0, 2, 4, 16)


def test_torch_tensors_zero_copy():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 4, 30, 64) for _ in range(3))
    out = attngen.attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max().item() < 1e-5
    buf = torch.empty_like(q)
    assert attngen.attention(q, k, v, causal=True, out=buf) is buf
    assert (buf - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout, sq", [("bhsd", 1), ("bshd", 1), ("bhsd", 24)])
def test_repeated_calls_reuse_the_checked_layout_with_their_own_arrays(layout, sq):
    """From the second call with the same shapes on, the checks are skipped: every call must
    still read its own q, k, v and write its own out and lse."""
    shape_q, shape_kv = ((2, 8, sq, 64), (2, 2, 40, 64)) if layout == "bhsd" else \
        ((2, sq, 8, 64), (2, 40, 2, 64))
    kern = attngen.get_kernel(attngen.AttentionSpec(
        head_dim=64, gqa=4, mask="causal", phase="decode" if sq == 1 else "prefill"))
    kern._checked_layouts.clear()
    out = np.empty(shape_q, np.float32)
    for call in range(3):
        q = rng.standard_normal(shape_q).astype(np.float32)
        k, v = (rng.standard_normal(shape_kv).astype(np.float32) for _ in range(2))
        got, lse = kern(q, k, v, causal=True, layout=layout, return_lse=True)
        into = kern(q, k, v, causal=True, layout=layout, out=out)
        ref, ref_lse = attention_reference(q, k, v, causal=True, layout=layout, return_lse=True)
        assert np.abs(got - ref).max() < 1e-5 and np.abs(lse - ref_lse).max() < 1e-5
        assert into is out and np.abs(out - ref).max() < 1e-5
    assert len(kern._checked_layouts) == 2     # with and without out=/return_lse


@pytest.mark.parametrize("dtype, layout", [("f32", "bhsd"), ("bf16", "bhsd"), ("f32", "bshd")])
def test_repeated_torch_calls_reuse_the_checked_layout_with_their_own_tensors(dtype, layout):
    """Tensors take the reused-layout path too (by data_ptr, strides in elements): every
    call must read its own q, k, v, including a view that starts past its storage's first
    element, and write its own out and lse."""
    torch = pytest.importorskip("torch")
    tdtype = torch.float32 if dtype == "f32" else torch.bfloat16
    shape_q, shape_kv = ((3, 8, 1, 64), (3, 2, 40, 64)) if layout == "bhsd" else \
        ((3, 1, 8, 64), (3, 40, 2, 64))
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=64, gqa=4, mask="causal",
                                                    phase="decode", dtype=dtype))
    kern._checked_layouts.clear()
    out = torch.empty(shape_q[0] - 1, *shape_q[1:], dtype=tdtype)
    tolerance = 1e-5 if dtype == "f32" else 2e-2
    for call in range(3):
        q, k, v = (torch.randn(*shape, dtype=tdtype)[1:]   # offset views
                   for shape in (shape_q, shape_kv, shape_kv))
        got, lse = kern(q, k, v, causal=True, layout=layout, return_lse=True)
        into = kern(q, k, v, causal=True, layout=layout, out=out)
        ref, ref_lse = attention_reference(*(x.float().numpy() for x in (q, k, v)), causal=True,
                                           layout=layout, return_lse=True)
        assert isinstance(got, torch.Tensor) and got.dtype == tdtype and got.shape == q.shape
        assert np.abs(got.float().numpy() - ref).max() < tolerance
        assert np.abs(lse.numpy() - ref_lse).max() < 1e-4
        assert into is out and np.abs(out.float().numpy() - ref).max() < tolerance
        found = attngen.attention(q, k, v, causal=True, layout=layout)   # spec from the tensors
        assert np.abs(found.float().numpy() - ref).max() < tolerance
    assert sum(key[0] == "torch" for key in kern._checked_layouts) == 3   # lse, out, plain


def test_torch_tensors_of_other_dtypes_are_refused_by_name():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 2, 1, 32) for _ in range(3))
    attngen.attention(q, k, v, causal=True)
    with pytest.raises(TypeError, match="q must be one of .*got float64"):
        attngen.attention(q.double(), k, v, causal=True)
    with pytest.raises(TypeError, match="k must be float32 for this kernel"):
        attngen.attention(q, k.double(), v, causal=True)


def test_torch_lengths_are_checked_when_a_layout_is_reused():
    torch = pytest.importorskip("torch")
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 16, 32), torch.randn(2, 2, 16, 32)
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal",
                                                    phase="decode"))
    for _ in range(2):
        kern(q, k, v, causal=True, kv_lens=torch.tensor([16, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_lens must be <= the cache capacity 16, got max 17"):
        kern(q, k, v, causal=True, kv_lens=torch.tensor([17, 3], dtype=torch.int32))
    lens = torch.tensor([7, 12], dtype=torch.int32)
    got = kern(q, k, v, causal=True, kv_lens=lens)
    ref = attention_reference(q.numpy(), k.numpy(), v.numpy(), causal=True, kv_lens=[7, 12])
    assert np.abs(got.numpy() - ref).max() < 1e-5


def test_a_remembered_torch_layout_is_not_reused_for_other_strides():
    torch = pytest.importorskip("torch")
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=32, gqa=1, mask="causal"))
    qkv = torch.randn(1, 3, 4, 16, 32)
    dense = [qkv[:, i].contiguous() for i in range(3)]
    for _ in range(2):
        kern(*dense, causal=True)
    got = kern(qkv[:, 0], qkv[:, 1], qkv[:, 2], causal=True)
    ref = attention_reference(*(x.numpy() for x in dense), causal=True)
    assert np.abs(got.numpy() - ref).max() < 1e-5


def test_a_remembered_layout_is_not_reused_for_other_strides():
    """A strided view with the same shape as an earlier dense call is read where it lies."""
    kern = attngen.get_kernel(attngen.AttentionSpec(head_dim=32, gqa=1, mask="causal"))
    qkv = rng.standard_normal((1, 3, 4, 16, 32)).astype(np.float32)
    dense = [np.ascontiguousarray(qkv[:, i]) for i in range(3)]
    kern(*dense, causal=True)
    got = kern(qkv[:, 0], qkv[:, 1], qkv[:, 2], causal=True)
    ref = attention_reference(*dense, causal=True)
    assert np.abs(got - ref).max() < 1e-5
