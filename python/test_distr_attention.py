"""Tests of distr_attention.py (run by ffi/tests/python.rs, or by hand):

    DA_LIBRARY=target/release/libdistr_attention.so python3 python/test_distr_attention.py -v

The tests that need numpy are skipped without it.
"""

import ctypes
import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distr_attention as da  # noqa: E402

try:
    import numpy as np
except ImportError:  # pragma: no cover - depends on the environment
    np = None

needs_numpy = unittest.skipIf(np is None, "numpy is not installed")


class WithoutNumpy(unittest.TestCase):
    def test_version(self):
        expected = os.environ.get("DA_EXPECT_VERSION")
        self.assertEqual(da.version(), expected or da.version())
        major, minor, patch = (int(x) for x in da.version().split("."))
        self.assertEqual(da.library().da_version_number(), major * 10000 + minor * 100 + patch)

    def test_struct_layout_matches_the_library(self):
        # da_config_default writes struct_size = the size passed, and the
        # library's defaults land in the fields ctypes declares.
        c = da._Config()
        self.assertEqual(da.library().da_config_default(ctypes.byref(c), ctypes.sizeof(c)), da.Status.OK)
        self.assertEqual(c.struct_size, ctypes.sizeof(da._Config))
        self.assertEqual((c.block_rows, c.group_size, c.num_projections, c.seed), (64, 2, 16, 0))
        self.assertEqual((c.fusion, c.causal, c.scale, c.reserved), (0, 0, 0.0, 0))
        self.assertFalse(c.group_sizes)
        # A config one byte too small is refused with a message.
        status = da.library().da_config_default(ctypes.byref(c), ctypes.sizeof(c) - 1)
        self.assertEqual(status, da.Status.INVALID_ARGUMENT)
        self.assertIn(b"struct_size", da.library().da_last_error_message())

    def test_status_strings(self):
        for s in da.Status:
            text = da.library().da_status_string(s)
            self.assertTrue(text and text != b"unknown status", s)
        self.assertEqual(da.library().da_status_string(1000), b"unknown status")

    def test_plan_shape_from_a_shape_tuple(self):
        s = da.plan_shape((2, 100, 4, 32), da.Config(block_rows=32))
        self.assertEqual(s, dict(batch=2, heads=4, blocks=4, head_dim=32, block_rows=32, num_entries=2 * 4 * 4 * 32))

    def test_errors_raise_with_status_and_message(self):
        with self.assertRaises(da.DistrAttentionError) as e:
            da.plan_shape((1, 10, 2, 16), da.Config(block_rows=0))
        self.assertEqual(e.exception.status, da.Status.BAD_CONFIG)
        self.assertIn("block_rows must be at least 1", e.exception.message)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.plan_shape((1, 0, 2, 16))
        self.assertEqual(e.exception.status, da.Status.INVALID_SHAPE)
        self.assertIn("q: dimension seq is zero", str(e.exception))

    def test_context_lifecycle(self):
        with da.Context() as ctx:
            self.assertTrue(ctx._ptr)
        self.assertFalse(ctx._ptr)
        ctx.close()  # twice is fine


def reference(q, k, v, causal=False, scale=None):
    """Exact attention in float64 with grouped-query heads; a row that sees no
    key (causal, more queries than keys) is 0, as in the library."""
    b, n, hq, d = q.shape
    m, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((b, n, hq, v.shape[3]))
    for h in range(hq):
        kh = h // (hq // hk)
        s = np.einsum("bnd,bmd->bnm", q[:, :, h].astype(np.float64), k[:, :, kh].astype(np.float64)) * scale
        if causal:
            mask = np.arange(m)[None, :] > np.arange(n)[:, None] + (m - n)
            s = np.where(mask[None], -np.inf, s)
        top = s.max(axis=-1, keepdims=True)
        p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
        p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
        out[:, :, h] = np.einsum("bnm,bmd->bnd", p, v[:, :, kh].astype(np.float64))
    return out


@needs_numpy
class WithNumpy(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(5)
        self.q = rng.standard_normal((2, 37, 4, 32)).astype(np.float32)
        self.k = rng.standard_normal((2, 29, 2, 32)).astype(np.float32)
        self.v = rng.standard_normal((2, 29, 2, 24)).astype(np.float32)

    def test_exact_attention_matches_numpy(self):
        for causal in (False, True):
            out, lse = da.exact_attention(self.q, self.k, self.v, da.Config(causal=causal), return_lse=True)
            self.assertEqual(out.shape, (2, 37, 4, 24))
            self.assertEqual(lse.shape, (2, 4, 37))
            want = reference(self.q, self.k, self.v, causal=causal)
            np.testing.assert_allclose(out, want, atol=2e-5)

    def test_group_size_one_is_exact(self):
        out = da.forward(self.q, self.k, self.v, da.Config(group_size=1))
        np.testing.assert_allclose(out, reference(self.q, self.k, self.v), atol=2e-5)

    def test_plan_then_attention_equals_forward(self):
        cfg = da.Config(group_size=4, block_rows=8, seed=3, fusion="sample", causal=True)
        p = da.plan(self.q, cfg)
        self.assertEqual(p.shape, (2, 4, 5, 32))
        self.assertTrue(all(sorted(block) == list(range(32)) for block in p.reshape(-1, 32).tolist()))
        out, lse, p2 = da.forward(self.q, self.k, self.v, cfg, return_lse=True, return_plan=True)
        np.testing.assert_array_equal(p, p2)
        out2, lse2 = da.attention(self.q, self.k, self.v, p, cfg, return_lse=True)
        np.testing.assert_array_equal(out, out2)
        np.testing.assert_array_equal(lse, lse2)
        # Rows are convex combinations of V rows.
        self.assertLessEqual(out.max(), self.v.max() + 1e-5)
        self.assertGreaterEqual(out.min(), self.v.min() - 1e-5)

    def test_per_head_group_sizes_and_projections(self):
        cfg = da.Config(group_sizes=[1, 2, 4, 8])
        out = da.forward(self.q, self.k, self.v, cfg)
        exact = da.exact_attention(self.q, self.k, self.v)
        np.testing.assert_array_equal(out[:, :, 0], exact[:, :, 0])  # head 0 has G = 1
        r = da.projections(da.Config(block_rows=5, num_projections=3, seed=1))
        self.assertEqual(r.shape, (5, 3))
        self.assertTrue(np.isfinite(r).all())

    def test_strided_views_without_copies(self):
        # Q, K, V as views of one packed [b, n, 3, h, d] array.
        qkv = np.random.default_rng(1).standard_normal((1, 20, 3, 2, 16)).astype(np.float32)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        self.assertFalse(q.flags.c_contiguous)
        out = np.zeros((1, 20, 2, 16), dtype=np.float32)
        result = da.exact_attention(q, k, v, out=out)
        self.assertIs(result, out)
        np.testing.assert_allclose(out, reference(q, k, v), atol=2e-5)

    def test_half_precision_inputs(self):
        q, k, v = (x.astype(np.float16) for x in (self.q, self.k, self.v))
        out = da.exact_attention(q, k, v)
        np.testing.assert_allclose(out, reference(q, k, v), atol=1e-4)

    def test_errors(self):
        bad = self.k.copy()
        bad[0, 3, 1, 7] = np.nan
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(self.q, bad, self.v)
        self.assertEqual(e.exception.status, da.Status.NON_FINITE)
        # An output over an input is refused, not written.
        q = self.q[:, :, :, :24].copy()
        with self.assertRaises(da.DistrAttentionError) as e:
            da.exact_attention(q, self.k[..., :24], self.v, out=q)
        self.assertEqual(e.exception.status, da.Status.OVERLAPPING_BUFFERS)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(self.q, self.k[:, :, :, :16], self.v)
        self.assertEqual(e.exception.status, da.Status.SHAPE_MISMATCH)
        with self.assertRaises(TypeError):
            da.forward(self.q.astype(np.float64), self.k, self.v)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(self.q, self.k.astype(np.float16), self.v)
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)


if __name__ == "__main__":
    unittest.main()
