//! The backward pass through the C ABI: equal to the core's fast backward,
//! and every status path of its arguments.

use distr_attention_core::backward::{attention_backward, exact_attention_backward, Forward, Gradients};
use distr_attention_core::{PlanRef, PlanShape};

use super::*;

/// A forward pass (through the ABI) and everything its backward pass needs.
struct Setup {
    p: Problem,
    cfg: da_config,
    o: Vec<f32>,
    lse: Vec<f32>,
    plan: Vec<u16>,
    d_out: Vec<f32>,
}

impl Setup {
    fn new(p: Problem, cfg: da_config) -> Self {
        let ctx = Ctx::new();
        let mut o = vec![0f32; p.out_len()];
        let mut lse = vec![0f32; p.lse_len()];
        let n = plan_shape(&cfg, &desc(&p.q, p.lq)).unwrap().num_entries;
        let mut plan = vec![0u16; n];
        expect(forward(&ctx, &cfg, &p.descs(&mut o), Some(&mut lse), Some(&mut plan)), da_status::Ok, "");
        let d_out = values(p.out_len(), 11);
        Setup { p, cfg, o, lse, plan, d_out }
    }

    fn small() -> Self {
        Setup::new(Problem::new(1, 20, 20, 2, 1, 16, 8), da_config { block_rows: 8, ..config() })
    }

    fn inputs(&self) -> [da_tensor; 5] {
        let p = &self.p;
        [desc(&p.q, p.lq), desc(&p.k, p.lk), desc(&p.v, p.lv), desc(&self.o, p.lo), desc(&self.d_out, p.lo)]
    }

    fn grads(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let len = |l: &Layout| l.required_len(Operand::Q).unwrap();
        (vec![f32::NAN; len(&self.p.lq)], vec![f32::NAN; len(&self.p.lk)], vec![f32::NAN; len(&self.p.lv)])
    }
}

/// Calls `da_attention_backward` (with a plan) or `da_exact_attention_backward`.
fn backward(
    ctx: &Ctx,
    cfg: &da_config,
    plan: Option<&[u16]>,
    [q, k, v, o, d_out]: &[da_tensor; 5],
    lse: &[f32],
    [dq, dk, dv]: &[da_tensor; 3],
) -> da_status {
    // SAFETY: every pointer addresses the extent its descriptor or length says.
    unsafe {
        match plan {
            Some(plan) => da_attention_backward(
                ctx.0,
                cfg,
                plan.as_ptr(),
                plan.len(),
                q,
                k,
                v,
                o,
                lse.as_ptr(),
                lse.len(),
                d_out,
                dq,
                dk,
                dv,
            ),
            None => da_exact_attention_backward(
                ctx.0,
                cfg,
                q,
                k,
                v,
                o,
                lse.as_ptr(),
                lse.len(),
                d_out,
                dq,
                dk,
                dv,
            ),
        }
    }
}

/// The core's fast backward on the same arguments.
fn core_backward(s: &Setup, cfg: &Config<'_>, with_plan: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let p = &s.p;
    let (mut dq, mut dk, mut dv) = s.grads();
    let fwd = Forward { o: Tensor::new(&s.o, p.lo), lse: &s.lse, d_out: Tensor::new(&s.d_out, p.lo) };
    let (mut tq, mut tk, mut tv) =
        (TensorMut::new(&mut dq, p.lq), TensorMut::new(&mut dk, p.lk), TensorMut::new(&mut dv, p.lv));
    let mut grads = Gradients { dq: &mut tq, dk: &mut tk, dv: &mut tv };
    let (q, k, v) = (Tensor::new(&p.q, p.lq), Tensor::new(&p.k, p.lk), Tensor::new(&p.v, p.lv));
    if with_plan {
        let plan = PlanRef::new(PlanShape::new(cfg, &p.lq).unwrap(), &s.plan).unwrap();
        attention_backward(cfg, &plan, &q, &k, &v, &fwd, &mut grads).unwrap();
    } else {
        exact_attention_backward(cfg, &q, &k, &v, &fwd, &mut grads).unwrap();
    }
    (dq, dk, dv)
}

#[test]
fn backward_matches_the_core() {
    let ctx = Ctx::new();
    let sizes = [1u32, 2, 4, 8];
    let sizes_usize = [1usize, 2, 4, 8];
    for (grouping, causal, fusion, per_head) in
        [(0, 1, 0, false), (1, 0, 1, true), (2, 1, 0, true), (0, 0, 1, false)]
    {
        let mut cfg = da_config { block_rows: 16, causal, fusion, grouping, group_size: 4, ..config() };
        if per_head {
            cfg.group_sizes = sizes.as_ptr();
            cfg.num_group_sizes = 4;
        }
        // GQA with tails: 37 queries, 29 keys, 4 query heads on 2 KV heads.
        let s = Setup::new(Problem::new(2, 37, 29, 4, 2, 32, 24), cfg);
        let mut c = core_config(&cfg);
        if per_head {
            c.group_sizes = GroupSizes::PerHead(&sizes_usize);
        }
        for with_plan in [true, false] {
            let (mut dq, mut dk, mut dv) = s.grads();
            let g = [desc_mut(&mut dq, s.p.lq), desc_mut(&mut dk, s.p.lk), desc_mut(&mut dv, s.p.lv)];
            let plan = with_plan.then_some(&s.plan[..]);
            expect(backward(&ctx, &cfg, plan, &s.inputs(), &s.lse, &g), da_status::Ok, "");
            let (wq, wk, wv) = core_backward(&s, &c, with_plan);
            assert_eq!((dq, dk, dv), (wq, wk, wv), "grouping {grouping} causal {causal} plan {with_plan}");
        }
    }
}

#[test]
fn backward_on_strided_half_inputs_and_outputs() {
    // Q, K, V as views of one packed bf16 buffer; gradients with gaps between heads.
    let (b, n, h, d) = (1, 19, 2, 16);
    let qkv: Vec<bf16> = values(b * n * 3 * h * d, 4).iter().map(|&x| bf16::from_f32(x)).collect();
    let view = Layout { stride_batch: n * 3 * h * d, stride_seq: 3 * h * d, ..dense(b, n, h, d) };
    let part = |i: usize| &qkv[i * h * d..];
    let lo = dense(b, n, h, d);
    let cfg = da_config { block_rows: 8, causal: 1, ..config() };
    let ctx = Ctx::new();
    let mut o = vec![0f32; lo.required_len(Operand::Output).unwrap()];
    let mut lse = vec![0f32; b * h * n];
    let np = plan_shape(&cfg, &desc(part(0), view)).unwrap().num_entries;
    let mut plan_buf = vec![0u16; np];
    let t = [desc(part(0), view), desc(part(1), view), desc(part(2), view), desc_mut(&mut o, lo)];
    expect(forward(&ctx, &cfg, &t, Some(&mut lse), Some(&mut plan_buf)), da_status::Ok, "");
    let d_out = values(o.len(), 2);
    let gl = Layout { stride_head: d + 5, stride_seq: h * (d + 5), stride_batch: n * h * (d + 5), ..lo };
    let glen = gl.required_len(Operand::DQ).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![-9f32; glen], vec![-9f32; glen], vec![-9f32; glen]);
    let inputs = [t[0], t[1], t[2], desc(&o, lo), desc(&d_out, lo)];
    let g = [desc_mut(&mut dq, gl), desc_mut(&mut dk, gl), desc_mut(&mut dv, gl)];
    expect(backward(&ctx, &cfg, Some(&plan_buf), &inputs, &lse, &g), da_status::Ok, "");

    let c = core_config(&cfg);
    let (mut wq, mut wk, mut wv) = (vec![-9f32; glen], vec![-9f32; glen], vec![-9f32; glen]);
    let fwd = Forward { o: Tensor::new(&o, lo), lse: &lse, d_out: Tensor::new(&d_out, lo) };
    let plan = PlanRef::new(PlanShape::new(&c, &view).unwrap(), &plan_buf).unwrap();
    let (mut a, mut bb, mut cc) =
        (TensorMut::new(&mut wq, gl), TensorMut::new(&mut wk, gl), TensorMut::new(&mut wv, gl));
    attention_backward(
        &c,
        &plan,
        &Tensor::new(part(0), view),
        &Tensor::new(part(1), view),
        &Tensor::new(part(2), view),
        &fwd,
        &mut Gradients { dq: &mut a, dk: &mut bb, dv: &mut cc },
    )
    .unwrap();
    assert_eq!((&dq, &dk, &dv), (&wq, &wk, &wv));
    // The gaps are not written.
    assert!(dq.chunks(d + 5).all(|c| c.len() < d + 5 || c[d..] == [-9.0; 5]));
    assert!(dq.iter().all(|x| x.is_finite()));
}

#[test]
fn backward_null_and_misaligned_pointers() {
    let ctx = Ctx::new();
    let s = Setup::small();
    let (mut dq, mut dk, mut dv) = s.grads();
    let g = [desc_mut(&mut dq, s.p.lq), desc_mut(&mut dk, s.p.lk), desc_mut(&mut dv, s.p.lv)];
    let i = s.inputs();
    let cfg = s.cfg;
    // SAFETY (every call): pointers valid, NULL, or rejected before use.
    unsafe {
        let n = s.plan.len();
        let lse = s.lse.as_ptr();
        let l = s.lse.len();
        let pp = s.plan.as_ptr();
        let np = da_status::NullPointer;
        let st = da_attention_backward(
            ctx.0,
            &cfg,
            pp,
            n,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            null(),
            l,
            &i[4],
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, np, "lse: pointer is NULL");
        let st = da_attention_backward(
            ctx.0,
            &cfg,
            null(),
            n,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, np, "plan: pointer is NULL");
        let st = da_attention_backward(
            ctx.0,
            &cfg,
            pp,
            n,
            &i[0],
            &i[1],
            &i[2],
            null(),
            lse,
            l,
            &i[4],
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, np, "output: tensor descriptor is NULL");
        let st = da_attention_backward(
            ctx.0,
            &cfg,
            pp,
            n,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            null(),
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, np, "d_out: tensor descriptor is NULL");
        let st = da_exact_attention_backward(
            ctx.0,
            &cfg,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            null(),
            &g[1],
            &g[2],
        );
        expect(st, np, "dq: tensor descriptor is NULL");
        let st = da_exact_attention_backward(
            ctx.0,
            &cfg,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            &g[0],
            null(),
            &g[2],
        );
        expect(st, np, "dk: tensor descriptor is NULL");
        let st = da_exact_attention_backward(
            ctx.0,
            &cfg,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            &g[0],
            &g[1],
            null(),
        );
        expect(st, np, "dv: tensor descriptor is NULL");
        let st = da_exact_attention_backward(
            null_mut(),
            &cfg,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, np, "context is NULL");
        let st = da_exact_attention_backward(
            ctx.0,
            null(),
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, np, "config is NULL");
        let mut nd = g;
        nd[0].data = null();
        let st = da_exact_attention_backward(
            ctx.0, &cfg, &i[0], &i[1], &i[2], &i[3], lse, l, &i[4], &nd[0], &g[1], &g[2],
        );
        expect(st, np, "dq: data pointer is NULL");
        let odd_lse = lse.cast::<u8>().wrapping_add(2).cast::<f32>();
        let st = da_exact_attention_backward(
            ctx.0, &cfg, &i[0], &i[1], &i[2], &i[3], odd_lse, l, &i[4], &g[0], &g[1], &g[2],
        );
        expect(st, da_status::MisalignedPointer, "lse: pointer");
        let odd_plan = pp.cast::<u8>().wrapping_add(1).cast::<u16>();
        let st = da_attention_backward(
            ctx.0,
            &cfg,
            odd_plan,
            n - 1,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, da_status::BufferTooSmall, "plan: buffer holds");
        let st = da_attention_backward(
            ctx.0,
            &cfg,
            odd_plan,
            n - 1 + 1,
            &i[0],
            &i[1],
            &i[2],
            &i[3],
            lse,
            l,
            &i[4],
            &g[0],
            &g[1],
            &g[2],
        );
        expect(st, da_status::MisalignedPointer, "plan: pointer");
    }
    let mut gm = g;
    gm[1].data = gm[1].data.cast::<u8>().wrapping_add(2).cast();
    expect(backward(&ctx, &cfg, None, &i, &s.lse, &gm), da_status::MisalignedPointer, "dk: data pointer");
    assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_nan()), "nothing written on error");
}

#[test]
fn backward_statuses() {
    let ctx = Ctx::new();
    let s = Setup::small();
    let (mut dq, mut dk, mut dv) = s.grads();
    let g = [desc_mut(&mut dq, s.p.lq), desc_mut(&mut dk, s.p.lk), desc_mut(&mut dv, s.p.lv)];
    let i = s.inputs();
    let cfg = s.cfg;
    let run = |cfg: &da_config, plan: Option<&[u16]>, i: &[da_tensor; 5], lse: &[f32], g: &[da_tensor; 3]| {
        backward(&ctx, cfg, plan, i, lse, g)
    };
    let plan = Some(&s.plan[..]);
    expect(
        run(&cfg, plan, &i, &s.lse[..s.lse.len() - 1], &g),
        da_status::BufferTooSmall,
        "lse: buffer holds 39 elements, 40 needed",
    );
    // Dtypes: Q's for K and V, f32 for everything the forward produced and for the gradients.
    let mut x = i;
    x[3].dtype = da_dtype::Bf16 as u32;
    expect(
        run(&cfg, plan, &x, &s.lse, &g),
        da_status::Unsupported,
        "output: dtype is bf16, the forward's output is f32",
    );
    let mut x = i;
    x[4].dtype = da_dtype::F16 as u32;
    expect(run(&cfg, plan, &x, &s.lse, &g), da_status::Unsupported, "d_out: dtype is f16");
    let mut y = g;
    y[2].dtype = da_dtype::F16 as u32;
    expect(
        run(&cfg, plan, &i, &s.lse, &y),
        da_status::Unsupported,
        "dv: dtype is f16, gradients must be f32",
    );
    let mut x = i;
    x[2].dtype = 9;
    expect(run(&cfg, plan, &x, &s.lse, &g), da_status::InvalidArgument, "v: dtype 9");
    // Shapes.
    let mut y = g;
    y[1].seq = 19;
    expect(run(&cfg, plan, &i, &s.lse, &y), da_status::ShapeMismatch, "dk: dimension seq is 19, expected 20");
    let mut x = i;
    x[4].heads = 1;
    expect(
        run(&cfg, plan, &x, &s.lse, &g),
        da_status::ShapeMismatch,
        "d_out: dimension heads is 1, expected 2",
    );
    let mut y = g;
    y[0].head_dim = 0;
    expect(run(&cfg, plan, &i, &s.lse, &y), da_status::InvalidShape, "dq: dimension head_dim is zero");
    let mut y = g;
    y[0].stride_batch = usize::MAX / 2;
    y[0].batch = 3;
    expect(run(&cfg, plan, &i, &s.lse, &y), da_status::SizeOverflow, "dq: size or offset overflows");
    // Config and plan.
    expect(
        run(&da_config { group_size: 3, ..cfg }, plan, &i, &s.lse, &g),
        da_status::BadConfig,
        "group size 3",
    );
    let mut bad_plan = s.plan.clone();
    bad_plan[0] = bad_plan[1];
    expect(run(&cfg, Some(&bad_plan), &i, &s.lse, &g), da_status::BadPlan, "not a permutation");
    expect(
        run(&cfg, Some(&s.plan[..s.plan.len() - 1]), &i, &s.lse, &g),
        da_status::BufferTooSmall,
        "plan: buffer holds",
    );
    // Non-finite inputs: d_out, the lse (NaN; -inf is a row that saw no key), V.
    let mut bad = s.d_out.clone();
    bad[3] = f32::INFINITY;
    let mut x = i;
    x[4] = desc(&bad, s.p.lo);
    expect(run(&cfg, plan, &x, &s.lse, &g), da_status::NonFinite, "d_out: non-finite value");
    let mut lse = s.lse.clone();
    lse[7] = f32::NAN;
    expect(run(&cfg, plan, &i, &lse, &g), da_status::NonFinite, "lse: non-finite value");
    // -inf is accepted (the value of a row that sees no key; here it is not
    // consistent with the forward, so the gradients of that row are not finite).
    lse[7] = f32::NEG_INFINITY;
    expect(run(&cfg, plan, &i, &lse, &g), da_status::Ok, "");
}

#[test]
fn backward_overlaps() {
    let ctx = Ctx::new();
    let s = Setup::small();
    let (mut dq, mut dk, mut dv) = s.grads();
    let g = [desc_mut(&mut dq, s.p.lq), desc_mut(&mut dk, s.p.lk), desc_mut(&mut dv, s.p.lv)];
    let i = s.inputs();
    let cfg = s.cfg;
    let plan = Some(&s.plan[..]);
    // A gradient written over each input (the descriptors keep the gradient's
    // shape; the data pointer moves into the input's buffer, which is large enough).
    for (idx, name) in [(0, "q"), (1, "k"), (2, "v"), (3, "output"), (4, "d_out")] {
        let mut y = g;
        y[2].data = i[idx].data;
        expect(
            backward(&ctx, &cfg, plan, &i, &s.lse, &y),
            da_status::OverlappingBuffers,
            &format!("dv: the buffer written overlaps the buffer of {name}"),
        );
    }
    let mut y = g;
    y[0].data = s.lse.as_ptr().cast();
    (y[0].batch, y[0].seq, y[0].heads) = (1, 1, 1);
    expect(
        backward(&ctx, &cfg, plan, &i, &s.lse, &y),
        da_status::OverlappingBuffers,
        "overlaps the buffer of lse",
    );
    let mut y = g;
    y[1].data = s.plan.as_ptr().cast();
    y[1].seq = 1;
    y[1].batch = 1;
    expect(
        backward(&ctx, &cfg, plan, &i, &s.lse, &y),
        da_status::OverlappingBuffers,
        "overlaps the buffer of plan",
    );
    // Gradients over each other.
    let mut y = g;
    y[2].data = y[1].data;
    expect(
        backward(&ctx, &cfg, plan, &i, &s.lse, &y),
        da_status::OverlappingBuffers,
        "dk: the buffer written overlaps the buffer of dv",
    );
    // Strides that make one gradient's elements collide.
    let mut y = g;
    y[0].stride_seq = 0;
    expect(
        backward(&ctx, &cfg, plan, &i, &s.lse, &y),
        da_status::OverlappingBuffers,
        "dq: strides make distinct elements overlap",
    );
    assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_nan()), "nothing written on error");
    // Inputs may overlap each other: d_out = o.
    let mut x = i;
    x[4] = x[3];
    expect(backward(&ctx, &cfg, plan, &x, &s.lse, &g), da_status::Ok, "");
}

#[test]
fn gradients_match_finite_differences_of_the_forward() {
    // The C forward on a fixed plan is a smooth function of Q, K, V: its
    // directional derivatives are the backward's gradients.
    let ctx = Ctx::new();
    let cfg = da_config { block_rows: 8, causal: 1, group_size: 2, ..config() };
    let s = Setup::new(Problem::new(1, 12, 12, 2, 1, 8, 4), cfg);
    let (mut dq, mut dk, mut dv) = s.grads();
    let g = [desc_mut(&mut dq, s.p.lq), desc_mut(&mut dk, s.p.lk), desc_mut(&mut dv, s.p.lv)];
    expect(backward(&ctx, &cfg, Some(&s.plan), &s.inputs(), &s.lse, &g), da_status::Ok, "");
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let mut o = vec![0f32; s.p.out_len()];
        let t = [desc(q, s.p.lq), desc(k, s.p.lk), desc(v, s.p.lv), desc_mut(&mut o, s.p.lo)];
        expect(attend(&ctx, &cfg, &s.plan, &t, None), da_status::Ok, "");
        o.iter().zip(&s.d_out).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let eps = 1e-2f32;
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
        let dir = values(grad.len(), 30 + which);
        let moved = |sign: f32| {
            let mut x = [s.p.q.clone(), s.p.k.clone(), s.p.v.clone()];
            for (a, d) in x[which].iter_mut().zip(&dir) {
                *a += sign * eps * d;
            }
            loss(&x[0], &x[1], &x[2])
        };
        let numeric = (moved(1.0) - moved(-1.0)) / (2.0 * eps as f64);
        let analytic: f64 = grad.iter().zip(&dir).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (numeric - analytic).abs() <= 2e-3 * (1.0 + analytic.abs()),
            "gradient {which}: finite difference {numeric}, backward {analytic}"
        );
    }
}
