"""Tests of distr_attention.py (run by ffi/tests/python.rs, or by hand):

    DA_LIBRARY=target/release/libdistr_attention.so python3 python/test_distr_attention.py -v

The tests that need numpy are skipped without it, those that need PyTorch (and
transformers) without those.
"""

import ctypes
import dataclasses
import math
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distr_attention as da  # noqa: E402

try:
    import numpy as np
except ImportError:  # pragma: no cover - depends on the environment
    np = None

needs_numpy = unittest.skipIf(np is None, "numpy is not installed")

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

needs_torch = unittest.skipIf(torch is None or np is None, "torch is not installed")

try:
    import transformers
except ImportError:  # pragma: no cover - depends on the environment
    transformers = None

needs_transformers = unittest.skipIf(transformers is None or torch is None, "transformers is not installed")


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
        self.assertEqual((c.fusion, c.causal, c.scale, c.grouping), (0, 0, 0.0, 0))
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

    def test_new_statuses_and_grouping_values(self):
        self.assertEqual(da.library().da_status_string(da.Status.NOT_FOUND), b"not found in the group-size table")
        with self.assertRaises(ValueError):
            da.Config(grouping="random")._c()
        c, _ = da.Config(grouping="key-weighted")._c()
        self.assertEqual(c.grouping, 2)

    def test_tables_without_numpy(self):
        table = ('{"grouping": "KeyWeighted", "block_rows": 16, "files": [{"file": "d/a.safetensors", '
                 '"layers": [{"layer": "layer0", "group_sizes": [1, 4]}]}]}')
        self.assertEqual(da.load_group_sizes(table, "layer0"), [1, 4])
        cfg = da.config_from_table(table, "layer0", "a.safetensors", da.Config(seed=3))
        self.assertEqual((cfg.group_sizes, cfg.block_rows, cfg.grouping, cfg.seed), ([1, 4], 16, "key_weighted", 3))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "table.json")
            with open(path, "w") as f:
                f.write(table)
            self.assertEqual(da.load_group_sizes(path, "layer0", "d/a.safetensors"), [1, 4])
            with self.assertRaises(da.DistrAttentionError) as e:
                da.load_group_sizes(os.path.join(d, "missing.json"), "layer0")
            self.assertEqual(e.exception.status, da.Status.IO_ERROR)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.load_group_sizes(table, "layer1")
        self.assertEqual(e.exception.status, da.Status.NOT_FOUND)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.load_group_sizes(table.replace("[1, 4]", "[1, 0]"), "layer0")
        self.assertEqual(e.exception.status, da.Status.BAD_TABLE)
        self.assertIn("group_sizes[1] is 0", e.exception.message)

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


def reference_backward(q, k, v, d_out, causal=False):
    """Gradients of exact attention in float64 (the textbook formulas), GQA
    summed over the query heads of a KV head."""
    b, n, hq, d = q.shape
    m, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for h in range(hq):
        kh = h // (hq // hk)
        qh, kk, vv = (x.astype(np.float64) for x in (q[:, :, h], k[:, :, kh], v[:, :, kh]))
        s = np.einsum("bnd,bmd->bnm", qh, kk) * scale
        if causal:
            mask = np.arange(m)[None, :] > np.arange(n)[:, None] + (m - n)
            s = np.where(mask[None], -np.inf, s)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        g = d_out[:, :, h].astype(np.float64)
        dv[:, :, kh] += np.einsum("bnm,bnd->bmd", p, g)
        dp = np.einsum("bnd,bmd->bnm", g, vv)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale
        dq[:, :, h] = np.einsum("bnm,bmd->bnd", ds, kk)
        dk[:, :, kh] += np.einsum("bnm,bnd->bmd", ds, qh)
    return dq, dk, dv


@needs_numpy
class GroupingEstimatesPlanner(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(7)
        self.q = rng.standard_normal((2, 33, 4, 16)).astype(np.float32)
        self.k = rng.standard_normal((2, 40, 2, 16)).astype(np.float32)
        self.v = rng.standard_normal((2, 40, 2, 8)).astype(np.float32)

    def test_every_grouping_mode_plans_and_attends(self):
        plans = {}
        for grouping in ("lsh", "similarity", "key_weighted"):
            cfg = da.Config(grouping=grouping, block_rows=16, group_sizes=[1, 2, 4, 8], causal=True)
            out, p = da.forward(self.q, self.k, self.v, cfg, return_plan=True)
            np.testing.assert_array_equal(da.plan(self.q, cfg, k=self.k), p)
            np.testing.assert_array_equal(da.attention(self.q, self.k, self.v, p, cfg), out)
            plans[grouping] = p
        self.assertFalse((plans["lsh"] == plans["similarity"]).all())
        np.testing.assert_array_equal(da.plan(self.q, da.Config(grouping="similarity", block_rows=16,
                                                                group_sizes=[1, 2, 4, 8])), plans["similarity"])
        with self.assertRaises(da.DistrAttentionError) as e:
            da.plan(self.q, da.Config(grouping="key_weighted"))
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(self.q[..., :12], self.k[..., :12], self.v, da.Config(grouping="similarity", group_size=6))
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)

    def test_estimates(self):
        cfg = da.Config(group_sizes=[1, 2, 4, 8], block_rows=16)
        e = da.estimate_errors(self.q, self.k, self.v, config=cfg)
        self.assertEqual(set(e), {"relative_score_error", "rms_logit_error", "sampled_output_error"})
        for a in e.values():
            self.assertEqual(a.shape, (2, 4))
            self.assertTrue((a[:, 0] < 1e-12).all())  # G = 1: 0 (sampled: up to f64 rounding)
            self.assertTrue((a[:, 1:] > 1e-3).all())
        p = da.plan(self.q, cfg)
        e2 = da.estimate_errors(self.q, self.k, self.v, p, cfg)
        np.testing.assert_array_equal(e["relative_score_error"], e2["relative_score_error"])
        none = da.estimate_errors(self.q, self.k, self.v, p, cfg, sample_rows=0)
        self.assertTrue(np.isnan(none["sampled_output_error"]).all())
        # All rows sampled: the sampled error is the measured one (f64 vs the fast path's f32).
        full = da.estimate_errors(self.q, self.k, self.v, p, cfg, sample_rows=1000)["sampled_output_error"]
        out = da.attention(self.q, self.k, self.v, p, cfg)
        exact = da.exact_attention(self.q, self.k, self.v, cfg)
        for b in range(2):
            for h in range(4):
                diff = np.linalg.norm(out[b, :, h] - exact[b, :, h]) / np.linalg.norm(exact[b, :, h])
                self.assertAlmostEqual(full[b, h], diff, delta=1e-4)

    def test_planner(self):
        cfg = da.Config(grouping="similarity", block_rows=16)
        samples = [(self.q, self.k, self.v), (self.q[:1, :20], self.k[:1], self.v[:1])]
        loose = da.choose_group_sizes(samples, max_error=100.0, config=cfg)
        self.assertEqual(loose.group_sizes, [8, 8, 8, 8])
        self.assertTrue(loose.target_met)
        tight = da.choose_group_sizes(samples, max_error=0.0, config=cfg)
        self.assertEqual((tight.group_sizes, tight.flop_saving), ([1, 1, 1, 1], 0.0))
        mid = da.choose_group_sizes(samples, max_error=0.5, candidates=[2, 4], config=cfg)
        self.assertTrue(all(m <= 0.5 for m in mid.measured_error))
        self.assertTrue(all(g in (1, 2, 4) for g in mid.group_sizes))
        flops = da.choose_group_sizes(samples, flop_saving=0.2, config=cfg)
        self.assertTrue(flops.target_met and flops.flop_saving >= 0.2)
        # The chosen sizes run as per-head sizes.
        out = da.forward(self.q, self.k, self.v, dataclasses.replace(cfg, group_sizes=mid.group_sizes))
        self.assertEqual(out.shape, (2, 33, 4, 8))
        with self.assertRaises(ValueError):
            da.choose_group_sizes(samples, config=cfg)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.choose_group_sizes(samples, flop_saving=1.5, config=cfg)
        self.assertEqual(e.exception.status, da.Status.INVALID_ARGUMENT)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.choose_group_sizes([], max_error=0.1)
        self.assertEqual(e.exception.status, da.Status.INVALID_ARGUMENT)


@needs_numpy
class Backward(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(11)
        # GQA with tails: 21 queries, 26 keys, 4 query heads on 2 KV heads.
        self.q = rng.standard_normal((1, 21, 4, 8)).astype(np.float32)
        self.k = rng.standard_normal((1, 26, 2, 8)).astype(np.float32)
        self.v = rng.standard_normal((1, 26, 2, 6)).astype(np.float32)
        self.d_out = rng.standard_normal((1, 21, 4, 6)).astype(np.float32)

    def test_exact_backward_matches_the_textbook_gradients(self):
        for causal in (False, True):
            cfg = da.Config(causal=causal)
            out, lse = da.exact_attention(self.q, self.k, self.v, cfg, return_lse=True)
            grads = da.exact_attention_backward(self.q, self.k, self.v, out, lse, self.d_out, cfg)
            want = reference_backward(self.q, self.k, self.v, self.d_out, causal)
            for got, w in zip(grads, want):
                np.testing.assert_allclose(got, w, atol=2e-4, rtol=1e-3)

    def test_backward_matches_finite_differences(self):
        # The output on a fixed plan is smooth in q, k, v: the directional
        # derivatives of sum(out * d_out) are the backward's gradients.
        for grouping, fusion in (("lsh", "mean"), ("similarity", "sample"), ("key_weighted", "mean")):
            cfg = da.Config(grouping=grouping, fusion=fusion, causal=True, block_rows=8, group_sizes=[1, 2, 4, 2])
            out, lse, p = da.forward(self.q, self.k, self.v, cfg, return_lse=True, return_plan=True)
            grads = da.attention_backward(self.q, self.k, self.v, out, lse, self.d_out, p, cfg)
            inputs = [self.q, self.k, self.v]
            rng = np.random.default_rng(3)

            def loss(xs):
                o = da.attention(xs[0], xs[1], xs[2], p, cfg)
                return float((o.astype(np.float64) * self.d_out).sum())

            eps = 1e-2
            for i, g in enumerate(grads):
                self.assertEqual(g.shape, inputs[i].shape)
                direction = rng.standard_normal(inputs[i].shape).astype(np.float32)
                plus = [x.copy() for x in inputs]
                minus = [x.copy() for x in inputs]
                plus[i] += eps * direction
                minus[i] -= eps * direction
                numeric = (loss(plus) - loss(minus)) / (2 * eps)
                analytic = float((g.astype(np.float64) * direction).sum())
                self.assertAlmostEqual(numeric, analytic, delta=3e-3 * (1 + abs(analytic)),
                                       msg=f"{grouping}: gradient {i}")
            # One element of dq by itself (a column of a fused group).
            h, r, j = 2, 17, 5
            plus, minus = self.q.copy(), self.q.copy()
            plus[0, r, h, j] += eps
            minus[0, r, h, j] -= eps
            numeric = (loss([plus, self.k, self.v]) - loss([minus, self.k, self.v])) / (2 * eps)
            self.assertAlmostEqual(numeric, float(grads[0][0, r, h, j]), delta=3e-3)

    def test_backward_errors(self):
        cfg = da.Config(block_rows=8)
        out, lse, p = da.forward(self.q, self.k, self.v, cfg, return_lse=True, return_plan=True)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention_backward(self.q, self.k, self.v, out, lse[:, :, :5], self.d_out, p, cfg)
        self.assertEqual(e.exception.status, da.Status.BUFFER_TOO_SMALL)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention_backward(self.q, self.k, self.v, out, lse, self.d_out.astype(np.float16), p, cfg)
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)
        bad = p.copy()
        bad[0, 0, 0, 0] = bad[0, 0, 0, 1]
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention_backward(self.q, self.k, self.v, out, lse, self.d_out, bad, cfg)
        self.assertEqual(e.exception.status, da.Status.BAD_PLAN)
        # A gradient written over an input is refused.
        with self.assertRaises(da.DistrAttentionError) as e:
            da.exact_attention_backward(self.q, self.k, self.v, out, lse, self.d_out, cfg, dq=self.q)
        self.assertEqual(e.exception.status, da.Status.OVERLAPPING_BUFFERS)


@needs_torch
class Torch(unittest.TestCase):
    """The autograd function against autograd of a plain torch implementation."""

    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.q = torch.randn(2, 19, 4, 16, generator=g, dtype=torch.float64)
        self.k = torch.randn(2, 23, 2, 16, generator=g, dtype=torch.float64)
        self.v = torch.randn(2, 23, 2, 8, generator=g, dtype=torch.float64)

    @staticmethod
    def plain(q, k, v, causal):
        hq, hk = q.shape[2], k.shape[2]
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[3])
        if causal:
            n, m = q.shape[1], k.shape[1]
            mask = torch.arange(m)[None, :] > torch.arange(n)[:, None] + (m - n)
            s = s.masked_fill(mask, float("-inf"))
        return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)

    def test_exact_gradients_match_autograd(self):
        for causal in (False, True):
            xs = [x.float().requires_grad_() for x in (self.q, self.k, self.v)]
            ys = [x.clone().requires_grad_() for x in (self.q, self.k, self.v)]
            out = da.distr_attention(*xs, da.Config(group_size=1, causal=causal))
            want = self.plain(*ys, causal)
            torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
            w = torch.randn(out.shape, dtype=torch.float64)
            (out.double() * w).sum().backward()
            (want * w).sum().backward()
            for a, b in zip(xs, ys):
                torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-4, rtol=1e-3)

    def test_finite_differences_with_grouping(self):
        # G = 2: the forward plans from Q (LSH), so moving Q could change the
        # plan; moving K or V leaves it fixed, and the output is smooth in them.
        cfg = da.Config(group_size=2, causal=True, block_rows=8)
        q = self.q.float()
        k, v = (x.float().requires_grad_() for x in (self.k, self.v))
        out = da.distr_attention(q, k, v, cfg)
        w = torch.randn(out.shape)
        (out * w).sum().backward()
        eps = 1e-2
        for x, g in ((k, k.grad), (v, v.grad)):
            d = torch.randn(x.shape)
            with torch.no_grad():
                args = {"k": k, "v": v}
                name = "k" if x is k else "v"
                plus = dict(args, **{name: x + eps * d})
                minus = dict(args, **{name: x - eps * d})
                fp = (da.distr_attention(q, plus["k"], plus["v"], cfg) * w).sum()
                fm = (da.distr_attention(q, minus["k"], minus["v"], cfg) * w).sum()
            numeric = float((fp - fm) / (2 * eps))
            self.assertAlmostEqual(numeric, float((g * d).sum()), delta=3e-3 * (1 + abs(numeric)))

    def test_bf16_inputs(self):
        xs = [x.bfloat16().requires_grad_() for x in (self.q, self.k, self.v)]
        out = da.distr_attention(*xs, da.Config(group_size=2))
        self.assertEqual(out.dtype, torch.bfloat16)
        out.float().sum().backward()
        self.assertEqual(xs[0].grad.dtype, torch.bfloat16)
        # The CPU-only functions refuse CUDA tensors rather than copying them.
        if torch.cuda.is_available():
            with self.assertRaises(NotImplementedError):
                da.estimate_errors(*(x.detach().cuda() for x in xs))


needs_cuda = unittest.skipIf(torch is None or np is None or not torch.cuda.is_available(),
                             "no CUDA device (or no torch)")


def plan_numpy(p):
    """A uint16 plan tensor (any device) as a numpy array."""
    p = p.cpu()
    try:
        return p.numpy().astype(np.uint16)
    except TypeError:  # torch without numpy support for uint16
        return p.view(torch.int16).numpy().view(np.uint16)


def relative_error(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


@needs_cuda
class Cuda(unittest.TestCase):
    """The CUDA entry points on torch CUDA tensors, against the CPU entry
    points on the same plan and a plain torch implementation."""

    def setUp(self):
        if not da.cuda_built():
            self.skipTest("the library was built without the CUDA entry points")
        g = torch.Generator(device="cuda").manual_seed(0)
        self.q = torch.randn(2, 200, 4, 64, device="cuda", generator=g).bfloat16()
        self.k = torch.randn(2, 180, 2, 64, device="cuda", generator=g).bfloat16()
        self.v = torch.randn(2, 180, 2, 64, device="cuda", generator=g).bfloat16()

    @staticmethod
    def plain(q, k, v, causal):
        """Exact attention in float32 with grouped-query heads (bottom-right causal mask)."""
        q, k, v = q.float(), k.float(), v.float()
        hq, hk = q.shape[2], k.shape[2]
        k = k.repeat_interleave(hq // hk, dim=2)
        v = v.repeat_interleave(hq // hk, dim=2)
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[3])
        if causal:
            n, m = q.shape[1], k.shape[1]
            rows = torch.arange(n, device=q.device)[:, None]
            mask = torch.arange(m, device=q.device)[None, :] > rows + (m - n)
            s = s.masked_fill(mask, float("-inf"))
        return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1).nan_to_num(), v)

    def test_forward_matches_the_cpu_on_the_same_plan(self):
        for causal, g in ((True, 2), (False, 4)):
            cfg = da.Config(group_size=g, causal=causal)
            out, lse, p = da.forward(self.q, self.k, self.v, cfg, return_lse=True, return_plan=True,
                                     out_dtype=torch.float32)
            self.assertEqual((out.device.type, out.dtype, lse.device.type, p.device.type),
                             ("cuda", torch.float32, "cuda", "cuda"))
            want, want_lse = da.attention(self.q.cpu(), self.k.cpu(), self.v.cpu(), plan_numpy(p), cfg,
                                          return_lse=True)
            self.assertLess(relative_error(out.cpu(), torch.from_numpy(want)), 1e-2)
            # Rows that see no key (causal, 200 queries over 180 keys) have -inf on both sides.
            torch.testing.assert_close(lse.cpu(), torch.from_numpy(want_lse), rtol=0, atol=1e-2)
            # The output in the inputs' dtype (the default) is the f32 one rounded.
            out16 = da.forward(self.q, self.k, self.v, cfg)
            self.assertEqual(out16.dtype, torch.bfloat16)
            self.assertLess(relative_error(out16, out), 1e-2)

    def test_plan_then_attention_equals_forward_and_the_cpu_plan(self):
        cfg = da.Config(group_size=2, causal=True)
        p = da.plan(self.q, cfg)
        replayed = da.attention(self.q, self.k, self.v, p, cfg)
        torch.testing.assert_close(replayed, da.forward(self.q, self.k, self.v, cfg), rtol=0, atol=0)
        # The GPU plans in f32, the CPU in f64 where rounding could flip a sign: nearly always the same.
        cpu = da.plan(self.q.cpu(), cfg)
        gpu = plan_numpy(p)
        self.assertEqual(gpu.shape, cpu.shape)
        differing = (gpu != cpu).any(axis=-1).mean()
        self.assertLess(differing, 0.05)
        # A CPU plan (a numpy array) replayed on the GPU.
        out = da.attention(self.q, self.k, self.v, cpu, cfg, out_dtype=torch.float32)
        want = da.attention(self.q.cpu(), self.k.cpu(), self.v.cpu(), cpu, cfg)
        self.assertLess(relative_error(out.cpu(), torch.from_numpy(want)), 1e-2)

    def test_exact_attention_matches_plain_torch_and_sdpa(self):
        import torch.nn.functional as F

        for causal in (False, True):
            cfg = da.Config(group_size=1, causal=causal)
            ours = da.exact_attention(self.q, self.k, self.v, cfg, out_dtype=torch.float32)
            want = self.plain(self.q, self.k, self.v, causal)
            self.assertLess(relative_error(ours, want), 1e-2)
            # SDPA on [b, h, n, d] with the KV heads repeated; its causal mask is
            # top-left aligned, so compare where the query and key lengths agree.
            q = self.q[:, :180]
            k, v = (x.repeat_interleave(2, dim=2) for x in (self.k, self.v))
            sdpa = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal)
            mine = da.exact_attention(q, self.k, self.v, cfg)
            self.assertLess(relative_error(mine, sdpa.transpose(1, 2)), 1e-2)
            # G = 1 through the forward (no plan computed) is the same kernel.
            torch.testing.assert_close(da.forward(self.q, self.k, self.v, cfg, out_dtype=torch.float32), ours,
                                       rtol=0, atol=0)
            torch.testing.assert_close(da.attention(self.q, self.k, self.v, None, cfg, out_dtype=torch.float32),
                                       ours, rtol=0, atol=0)

    def test_views_streams_and_threads(self):
        import threading

        cfg = da.Config(group_size=2)
        want = da.forward(self.q, self.k, self.v, cfg)
        # Q, K and V as views of one packed buffer, on a side stream.
        q, k, v = self.q, self.k, self.v
        packed = torch.zeros(2, 200, 8, 64, device="cuda", dtype=torch.bfloat16)
        packed[:, :, :4] = q
        packed[:, :180, 4:6] = k
        packed[:, :180, 6:] = v
        views = packed[:, :, :4], packed[:, :180, 4:6], packed[:, :180, 6:]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = da.forward(*views, cfg)
        torch.cuda.current_stream().wait_stream(side)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # Another thread (its own CudaContext, the device's context made current there).
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("out", da.forward(q, k, v, cfg)))
        thread.start()
        thread.join()
        torch.cuda.synchronize()
        torch.testing.assert_close(result["out"], want, rtol=0, atol=0)

    def test_errors(self):
        cfg = da.Config(group_size=2)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(self.q.float(), self.k.float(), self.v.float(), cfg)
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)
        self.assertIn("f16 or bf16", e.exception.message)
        with self.assertRaises(ValueError):
            da.forward(self.q, self.k.cpu(), self.v, cfg)
        # Q one element (2 bytes) past a 16-byte boundary.
        buffer = torch.zeros(self.q.numel() + 8, device="cuda", dtype=torch.bfloat16)
        shifted = buffer[1:1 + self.q.numel()].view(self.q.shape)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(shifted, self.k, self.v, cfg)
        self.assertEqual(e.exception.status, da.Status.MISALIGNED_POINTER)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(self.q, self.k, self.v, da.Config(group_size=16))
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)
        # Key-weighted plans need the keys (da.forward plans them on the GPU).
        with self.assertRaises(da.DistrAttentionError) as e:
            da.plan(self.q, da.Config(grouping="key_weighted"))
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)
        self.assertIn("keys", e.exception.message)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention(self.q, self.k, self.v, None, cfg)
        self.assertEqual(e.exception.status, da.Status.NULL_POINTER)
        # The output over an input.
        with self.assertRaises(da.DistrAttentionError) as e:
            da.forward(self.q, self.k, self.v, cfg, out=self.q)
        self.assertEqual(e.exception.status, da.Status.OVERLAPPING_BUFFERS)

    def test_similarity_plan_on_the_gpu(self):
        # The GPU similarity plan is the CPU's except in blocks with a near-tie
        # (cuda-driver/tests/gpu_similarity.rs counts them); every block is a permutation.
        cfg = da.Config(grouping="similarity", group_size=2, block_rows=64)
        got = plan_numpy(da.plan(self.q, cfg))
        want = da.plan(self.q.cpu(), cfg)
        self.assertEqual(got.shape, want.shape)
        self.assertTrue((np.sort(got, axis=-1) == np.arange(got.shape[-1])).all())
        same = (got == want).all(axis=-1).mean()
        self.assertGreaterEqual(same, 0.95, f"{same:.3f} of the blocks equal the CPU's")
        # Trained through: forward keeps the similarity plan, backward runs on it.
        xs = [x.detach().requires_grad_() for x in (self.q, self.k, self.v)]
        da.distr_attention(*xs, dataclasses.replace(cfg, causal=True)).float().sum().backward()
        self.assertTrue(all(torch.isfinite(x.grad).all() for x in xs))

    def test_autograd_function_runs_the_gpu_forward(self):
        cfg = da.Config(group_size=2, causal=True)
        # Without gradients: the forward in the inputs' dtype.
        with torch.no_grad():
            out = da.distr_attention(self.q, self.k, self.v, cfg)
        torch.testing.assert_close(out, da.forward(self.q, self.k, self.v, cfg), rtol=0, atol=0)
        # With gradients: the float32 forward (kept for the backward), rounded.
        xs = [x.clone().requires_grad_() for x in (self.q, self.k, self.v)]
        out = da.distr_attention(*xs, cfg)
        want = da.forward(self.q, self.k, self.v, cfg, out_dtype=torch.float32).bfloat16()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        out.float().sum().backward()
        self.assertTrue(all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in xs))

    def test_expandable_segments_allocator(self):
        # PyTorch's expandable segments map memory with the virtual memory
        # API: the library's pointer checks must accept it.
        import subprocess

        script = ("import sys, torch; sys.path.insert(0, %r); import distr_attention as da; "
                  "q = torch.randn(1, 128, 2, 64, device='cuda').bfloat16(); "
                  "out = da.forward(q, q, q, da.Config(group_size=2)); torch.cuda.synchronize(); "
                  "print('ok', float(out.float().abs().sum()) > 0)") % os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("ok True", run.stdout)


def plain_distr(q, k, v, plan, group, block_rows, causal):
    """DistrAttention on a fixed plan (uniform G, mean fusion, default scale)
    in plain differentiable torch, float64: per query block, Q's columns
    permuted by the block's plan and averaged in groups of G, K's columns
    permuted the same way and summed; softmax and P V exact."""
    q, k, v = q.double(), k.double(), v.double()
    b, n, hq, d = q.shape
    m, hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=2)
    v = v.repeat_interleave(hq // hk, dim=2)
    idx = torch.from_numpy(plan_numpy(plan).astype(np.int64)).to(q.device)  # [b, hq, blocks, d]
    nb, t = idx.shape[2], d // group
    qb = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, nb * block_rows - n))
    qb = qb.view(b, nb, block_rows, hq, d).permute(0, 3, 1, 2, 4)
    qhat = qb.gather(4, idx[:, :, :, None, :].expand(b, hq, nb, block_rows, d))
    qhat = qhat.view(b, hq, nb, block_rows, t, group).mean(-1)
    kb = k.permute(0, 2, 1, 3)[:, :, None].expand(b, hq, nb, m, d)
    khat = kb.gather(4, idx[:, :, :, None, :].expand(b, hq, nb, m, d)).view(b, hq, nb, m, t, group).sum(-1)
    s = torch.einsum("bhcit,bhcjt->bhcij", qhat, khat).reshape(b, hq, nb * block_rows, m)[:, :, :n]
    s = s / math.sqrt(d)
    if causal:
        rows = torch.arange(n, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(m, device=q.device)[None, :] > rows + (m - n), float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1).nan_to_num(), v)


@needs_cuda
class CudaBackward(unittest.TestCase):
    """The GPU backward (da_cuda_attention_backward) from Python: against the
    CPU backward on the same plan and inputs, and against torch autograd of
    :func:`plain_distr` (float64) on the GPU's plan. Tolerances, relative
    Frobenius error of each gradient: 3e-2 for bf16 inputs, 1e-2 for f16
    (the GPU rounds Q-hat, K-hat, P and dS to the input type as tensor-core
    operands; the CPU and the float64 reference do not)."""

    TOL = None

    def setUp(self):
        if not da.cuda_built():
            self.skipTest("the library was built without the CUDA entry points")
        self.gen = torch.Generator(device="cuda").manual_seed(1)
        self.TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}

    def randn(self, *shape):
        return torch.randn(*shape, device="cuda", generator=self.gen)

    def test_backward_matches_the_cpu_on_the_same_plan(self):
        # 200 queries over 180 keys (the first 20 rows see no key when causal), GQA 6:2.
        base = self.randn(2, 200, 6, 64), self.randn(2, 180, 2, 64), self.randn(2, 180, 2, 64)
        for dtype, tol in self.TOL.items():
            q, k, v = (x.to(dtype) for x in base)
            for causal, g, rows in ((True, 2, 64), (False, 4, 128), (True, 8, 64), (True, 1, 64)):
                cfg = da.Config(group_size=g, causal=causal, block_rows=rows)
                out, lse, p = da.forward(q, k, v, cfg, return_lse=True, return_plan=True, out_dtype=torch.float32)
                d_out = self.randn(*out.shape).to(dtype)
                got = da.attention_backward(q, k, v, out, lse, d_out, p, cfg, grad_dtype=torch.float32)
                plan = plan_numpy(p)
                out_c, lse_c = da.attention(q.cpu(), k.cpu(), v.cpu(), plan, cfg, return_lse=True)
                want = da.attention_backward(q.cpu(), k.cpu(), v.cpu(), out_c, lse_c, d_out.float().cpu(), plan, cfg)
                for name, a, b in zip(("dq", "dk", "dv"), got, want):
                    self.assertEqual((a.device.type, a.dtype, tuple(a.shape)), ("cuda", torch.float32, b.shape))
                    err = relative_error(a.cpu(), torch.from_numpy(b))
                    self.assertLess(err, tol, f"{name} {dtype} causal={causal} G={g}: {err:.2e}")
            # Exact attention's backward, gradients in the inputs' dtype, an f32 d_out.
            cfg = da.Config(group_size=1, causal=True)
            out, lse = da.exact_attention(q, k, v, cfg, return_lse=True, out_dtype=torch.float32)
            d_out = self.randn(*out.shape)
            got = da.exact_attention_backward(q, k, v, out, lse, d_out, cfg)
            out_c, lse_c = da.exact_attention(q.cpu(), k.cpu(), v.cpu(), cfg, return_lse=True)
            want = da.exact_attention_backward(q.cpu(), k.cpu(), v.cpu(), out_c, lse_c, d_out.cpu(), cfg)
            for name, a, b in zip(("dq", "dk", "dv"), got, want):
                self.assertEqual(a.dtype, dtype)
                err = relative_error(a.cpu(), torch.from_numpy(b))
                self.assertLess(err, tol, f"exact {name} {dtype}: {err:.2e}")

    def test_autograd_matches_plain_torch(self):
        # SmolLM2-135M's attention shape: 9 query heads over 3 KV heads, head_dim 64, causal.
        base = self.randn(2, 160, 9, 64), self.randn(2, 160, 3, 64), self.randn(2, 160, 3, 64)
        for dtype, tol in self.TOL.items():
            for g in (2, 4, 1):
                cfg = da.Config(group_size=g, causal=True)
                xs = [x.to(dtype).requires_grad_() for x in base]
                out = da.distr_attention(*xs, cfg)
                self.assertEqual(out.dtype, dtype)
                ys = [x.detach().double().requires_grad_() for x in xs]
                # The forward's plan: the GPU plan of Q is deterministic.
                want = plain_distr(*ys, da.plan(xs[0].detach(), cfg), g, cfg.block_rows, True)
                self.assertLess(relative_error(out, want), tol)
                w = self.randn(*out.shape).to(dtype)
                (out.float() * w.float()).sum().backward()
                (want * w.double()).sum().backward()
                for name, a, b in zip(("dq", "dk", "dv"), xs, ys):
                    self.assertEqual(a.grad.dtype, dtype)
                    err = relative_error(a.grad, b.grad)
                    self.assertLess(err, tol, f"{name} {dtype} G={g}: {err:.2e}")

    def test_views_side_stream_and_per_head_group_sizes(self):
        cfg = da.Config(group_size=2, causal=True)
        q, k, v = self.randn(2, 130, 6, 64), self.randn(2, 130, 2, 64), self.randn(2, 130, 2, 64)
        packed = torch.cat([q, k, v], dim=2).bfloat16().requires_grad_()
        xs = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        w = self.randn(2, 130, 6, 64).bfloat16()
        (da.distr_attention(*xs, cfg) * w).sum().backward()
        # Q, K and V as views of one packed leaf (strided), forward and backward on a side stream.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            views = packed[:, :, :6], packed[:, :, 6:8], packed[:, :, 8:]
            (da.distr_attention(*views, cfg) * w).sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        dq, dk, dv = packed.grad[:, :, :6], packed.grad[:, :, 6:8], packed.grad[:, :, 8:]
        # dK and dV are deterministic; dQ sums atomics in a varying order.
        torch.testing.assert_close(dk, xs[1].grad, rtol=0, atol=0)
        torch.testing.assert_close(dv, xs[2].grad, rtol=0, atol=0)
        self.assertLess(relative_error(dq, xs[0].grad), 1e-2)
        # Per-head group sizes (mixed, G = 1 included) against the CPU backward on the same plan.
        cfg = da.Config(group_sizes=[1, 2, 4, 2, 8, 1], causal=True)
        ys = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
        (da.distr_attention(*ys, cfg) * w).sum().backward()
        p = plan_numpy(da.plan(ys[0].detach(), cfg))
        host = [y.detach().cpu() for y in ys]
        out_c, lse_c = da.attention(*host, p, cfg, return_lse=True)
        want = da.attention_backward(*host, out_c, lse_c, w.float().cpu(), p, cfg)
        for name, y, b in zip(("dq", "dk", "dv"), ys, want):
            err = relative_error(y.grad.cpu(), torch.from_numpy(b))
            self.assertLess(err, 3e-2, f"per-head {name}: {err:.2e}")

    def test_backward_errors(self):
        q, k, v = (x.bfloat16() for x in (self.randn(1, 64, 2, 64), self.randn(1, 64, 1, 64), self.randn(1, 64, 1, 64)))
        cfg = da.Config(group_size=2)
        with self.assertRaises(TypeError) as e:
            da.distr_attention(*(x.float().requires_grad_() for x in (q, k, v)), cfg)
        self.assertIn("float16 or bfloat16", str(e.exception))
        out, lse, p = da.forward(q, k, v, cfg, return_lse=True, return_plan=True, out_dtype=torch.float32)
        d_out = torch.ones_like(out)
        with self.assertRaises(ValueError):
            da.attention_backward(q, k, v, out, lse.cpu(), d_out, p, cfg)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention_backward(q, k, v, out, lse, d_out.half(), p, cfg)
        self.assertEqual(e.exception.status, da.Status.UNSUPPORTED)
        self.assertIn("d_out", e.exception.message)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention_backward(q, k, v, out, lse, d_out, None, cfg)
        self.assertEqual(e.exception.status, da.Status.NULL_POINTER)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention_backward(q, k, v, out, lse, d_out, p, cfg, dq=q)
        self.assertEqual(e.exception.status, da.Status.OVERLAPPING_BUFFERS)
        with self.assertRaises(da.DistrAttentionError) as e:
            da.attention_backward(q, k, v, out, lse[:, :, :10].contiguous(), d_out, p, cfg)
        self.assertEqual(e.exception.status, da.Status.BUFFER_TOO_SMALL)


class WithoutCudaEntryPoints(unittest.TestCase):
    def test_cuda_status_without_the_entry_points(self):
        if da.cuda_built():
            self.skipTest("the library has the CUDA entry points")
        lib = da.library()
        ptr = ctypes.c_void_p()
        self.assertEqual(lib.da_cuda_context_create(ctypes.byref(ptr)), da.Status.CUDA_UNAVAILABLE)
        self.assertIn(b"built without CUDA", lib.da_last_error_message())
        self.assertFalse(ptr)
        if torch is not None and torch.cuda.is_available():
            with self.assertRaises(da.DistrAttentionError) as e:
                da.forward(*(torch.zeros(1, 8, 1, 64, device="cuda").bfloat16() for _ in range(3)))
            self.assertEqual(e.exception.status, da.Status.CUDA_UNAVAILABLE)


@needs_transformers
class Transformers(unittest.TestCase):
    def model(self, implementation):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cfg._attn_implementation = implementation
        return LlamaForCausalLM(cfg).eval()

    def test_exact_config_reproduces_sdpa_and_trains(self):
        name = da.register_transformers(da.Config(group_size=1))
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
        ref = self.model("sdpa")
        ours = self.model(name)
        ours.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        # G = 2 changes the logits, and the loss backpropagates through the C ABI.
        da.register_transformers(da.Config(group_size=2))
        loss = ours(ids, labels=ids).loss
        loss.backward()
        grad = ours.model.layers[0].self_attn.q_proj.weight.grad
        self.assertTrue(grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0)
        # A padding mask is refused, not ignored.
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[0, :3] = 0
        with self.assertRaises(ValueError):
            ours(ids, attention_mask=mask)

    def test_autocast_casts_inputs_like_sdpa(self):
        # Llama-style models hand float32 Q/K (RoPE in float32) and a bf16 V to the
        # attention under autocast; SDPA computes in bf16 there, and so do we.
        name = da.register_transformers(da.Config(group_size=2, causal=True))
        module = torch.nn.Module()
        g = torch.Generator().manual_seed(3)
        q, k = torch.randn(1, 4, 40, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g)
        v = torch.randn(1, 2, 40, 32, generator=g).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = da.hf_attention(module, q, k, v, None, is_causal=True)
        cfg = da.Config(group_size=2, causal=True)
        want = da.distr_attention(*(x.transpose(1, 2).bfloat16() for x in (q, k, v)), cfg)
        self.assertEqual(got.dtype, torch.bfloat16)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        self.assertEqual(name, "distr_attention")

    def test_cuda_training_steps(self):
        if not torch.cuda.is_available() or not da.cuda_built():
            self.skipTest("no CUDA device or a library without the CUDA entry points")
        from transformers import LlamaConfig, LlamaForCausalLM

        # SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64), two small layers, bf16.
        def model(implementation):
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
            cfg._attn_implementation = implementation
            return LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)

        name = da.register_transformers(da.Config(group_size=1))
        ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(2)).cuda()
        ref, ours = model("sdpa"), model(name)
        ours.load_state_dict(ref.state_dict())
        # G = 1: SDPA's loss and gradients up to bf16 rounding.
        losses = [m(ids, labels=ids).loss for m in (ref, ours)]
        for loss in losses:
            loss.backward()
        self.assertAlmostEqual(losses[0].item(), losses[1].item(), delta=1e-2)
        for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
            self.assertLess(relative_error(b.grad, a.grad), 5e-2, n)
        # G = 2: a few AdamW steps on one batch lower its loss; every gradient finite.
        da.register_transformers(da.Config(group_size=2, block_rows=128))
        ours.zero_grad()
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
        history = []
        for _ in range(5):
            loss = ours(ids, labels=ids).loss
            loss.backward()
            self.assertTrue(all(torch.isfinite(p.grad).all() for p in ours.parameters()))
            opt.step()
            opt.zero_grad()
            history.append(loss.item())
        self.assertLess(history[-1], history[0] - 0.1, history)


if __name__ == "__main__":
    unittest.main()
