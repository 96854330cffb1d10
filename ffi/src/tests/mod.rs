//! Tests of the C ABI from Rust: every status path, the last-error contract,
//! and agreement with the core crate's API on the same inputs.

use core::ffi::{c_void, CStr};
use core::mem::size_of;
use core::ptr::{null, null_mut};

use distr_attention_core::half::{bf16, f16};
use distr_attention_core::{
    distr_attention, exact_attention, plan, projections, Config, Element, Fusion, GroupSizes, GroupingMode,
    Layout, Operand, Tensor, TensorMut,
};

use crate::error::{boundary, last_error, Failure};
use crate::*;

/// Deterministic values in [-1, 1).
fn values(len: usize, salt: usize) -> Vec<f32> {
    (0..len).map(|i| (((i + salt * 7919) * 2_654_435_761usize) % 2000) as f32 / 1000.0 - 1.0).collect()
}

fn dense(b: usize, n: usize, h: usize, d: usize) -> Layout {
    Layout::contiguous(b, n, h, d)
}

fn desc_raw(data: *const c_void, dtype: da_dtype, l: Layout) -> da_tensor {
    da_tensor {
        data,
        dtype: dtype as u32,
        batch: l.batch,
        seq: l.seq,
        heads: l.heads,
        head_dim: l.dim,
        stride_batch: l.stride_batch,
        stride_seq: l.stride_seq,
        stride_head: l.stride_head,
    }
}

fn desc<T: Element>(data: &[T], l: Layout) -> da_tensor {
    let dtype = match T::DTYPE {
        distr_attention_core::DType::F32 => da_dtype::F32,
        distr_attention_core::DType::F16 => da_dtype::F16,
        distr_attention_core::DType::BF16 => da_dtype::Bf16,
    };
    desc_raw(data.as_ptr().cast(), dtype, l)
}

/// An output descriptor: the pointer comes from a unique borrow, as the library writes through it.
fn desc_mut(data: &mut [f32], l: Layout) -> da_tensor {
    desc_raw(data.as_mut_ptr().cast(), da_dtype::F32, l)
}

fn config() -> da_config {
    let mut c = core::mem::MaybeUninit::<da_config>::uninit();
    // SAFETY: `c` has room for a da_config.
    assert_eq!(unsafe { da_config_default(c.as_mut_ptr(), size_of::<da_config>()) }, da_status::Ok);
    // SAFETY: initialised by da_config_default.
    unsafe { c.assume_init() }
}

/// A context freed on drop.
struct Ctx(*mut da_context);

impl Ctx {
    fn new() -> Self {
        let mut p = null_mut();
        // SAFETY: `p` is writable.
        assert_eq!(unsafe { da_context_new(&mut p) }, da_status::Ok);
        assert!(!p.is_null());
        Ctx(p)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: created by da_context_new, freed once.
        unsafe { da_context_free(self.0) }
    }
}

/// A problem in f32: Q [b, n, hq, d], K [b, m, hk, d], V [b, m, hk, dv], O dense.
struct Problem {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lq: Layout,
    lk: Layout,
    lv: Layout,
    lo: Layout,
}

impl Problem {
    fn new(b: usize, n: usize, m: usize, hq: usize, hk: usize, d: usize, dv: usize) -> Self {
        let (lq, lk, lv, lo) =
            (dense(b, n, hq, d), dense(b, m, hk, d), dense(b, m, hk, dv), dense(b, n, hq, dv));
        let len = |l: &Layout| l.required_len(Operand::Q).unwrap();
        Problem { q: values(len(&lq), 1), k: values(len(&lk), 2), v: values(len(&lv), 3), lq, lk, lv, lo }
    }

    fn small() -> Self {
        Problem::new(1, 20, 20, 2, 2, 16, 16)
    }

    fn out_len(&self) -> usize {
        self.lo.required_len(Operand::Output).unwrap()
    }

    fn lse_len(&self) -> usize {
        self.lq.batch * self.lq.heads * self.lq.seq
    }

    fn descs(&self, out: &mut [f32]) -> [da_tensor; 4] {
        [desc(&self.q, self.lq), desc(&self.k, self.lk), desc(&self.v, self.lv), desc_mut(out, self.lo)]
    }
}

fn forward(
    ctx: &Ctx,
    cfg: &da_config,
    t: &[da_tensor; 4],
    lse: Option<&mut [f32]>,
    plan: Option<&mut [u16]>,
) -> da_status {
    let (lse, lse_len) = lse.map_or((null_mut(), 0), |l| (l.as_mut_ptr(), l.len()));
    let (plan, plan_len) = plan.map_or((null_mut(), 0), |p| (p.as_mut_ptr(), p.len()));
    // SAFETY: every pointer addresses the extent its descriptor or length says.
    unsafe { da_forward(ctx.0, cfg, &t[0], &t[1], &t[2], &t[3], lse, lse_len, plan, plan_len) }
}

fn exact(ctx: &Ctx, cfg: &da_config, t: &[da_tensor; 4], lse: Option<&mut [f32]>) -> da_status {
    let (lse, lse_len) = lse.map_or((null_mut(), 0), |l| (l.as_mut_ptr(), l.len()));
    // SAFETY: as in `forward`.
    unsafe { da_exact_attention(ctx.0, cfg, &t[0], &t[1], &t[2], &t[3], lse, lse_len) }
}

fn attend(
    ctx: &Ctx,
    cfg: &da_config,
    plan: &[u16],
    t: &[da_tensor; 4],
    lse: Option<&mut [f32]>,
) -> da_status {
    let (lse, lse_len) = lse.map_or((null_mut(), 0), |l| (l.as_mut_ptr(), l.len()));
    // SAFETY: as in `forward`.
    unsafe { da_attention(ctx.0, cfg, plan.as_ptr(), plan.len(), &t[0], &t[1], &t[2], &t[3], lse, lse_len) }
}

fn plan_into_buf(ctx: &Ctx, cfg: &da_config, q: &da_tensor, out: &mut [u16]) -> da_status {
    // SAFETY: as in `forward`.
    unsafe { da_plan(ctx.0, cfg, q, out.as_mut_ptr(), out.len()) }
}

fn plan_shape(cfg: &da_config, q: &da_tensor) -> Result<da_plan_shape, da_status> {
    let mut s = da_plan_shape::default();
    // SAFETY: all three are valid.
    match unsafe { da_get_plan_shape(cfg, q, &mut s) } {
        da_status::Ok => Ok(s),
        e => Err(e),
    }
}

fn message() -> String {
    // SAFETY: the library returns a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(da_last_error_message()) }.to_str().unwrap().to_owned();
    assert_eq!(s, last_error());
    s
}

/// Asserts a status and that the message is non-empty and mentions `needle`.
#[track_caller]
fn expect(got: da_status, want: da_status, needle: &str) {
    let msg = message();
    assert_eq!(got, want, "message: {msg}");
    if want == da_status::Ok {
        assert!(msg.is_empty(), "success leaves an empty message, got {msg:?}");
    } else {
        assert!(!msg.is_empty(), "{want:?} without a message");
        assert!(msg.contains(needle), "message {msg:?} does not mention {needle:?}");
    }
}

fn core_config(c: &da_config) -> Config<'static> {
    Config {
        block_rows: c.block_rows,
        group_sizes: GroupSizes::Uniform(c.group_size as usize),
        num_projections: c.num_projections,
        seed: c.seed,
        fusion: if c.fusion == 1 { Fusion::Sample } else { Fusion::Mean },
        causal: c.causal != 0,
        scale: if c.scale == 0.0 { None } else { Some(c.scale) },
        grouping: match c.grouping {
            0 => GroupingMode::Lsh,
            1 => GroupingMode::Similarity,
            2 => GroupingMode::KeyWeighted,
            other => panic!("grouping {other} in a test config"),
        },
    }
}

// ---------------------------------------------------------------- results

#[test]
fn forward_matches_the_core_one_shot() {
    let ctx = Ctx::new();
    for (causal, fusion, g, block_rows, seed) in
        [(0, 0, 2, 8, 0), (1, 1, 4, 64, 7), (1, 0, 8, 3, 99), (0, 1, 1, 16, 1)]
    {
        let p = Problem::new(2, 37, 29, 4, 2, 32, 24);
        let cfg = da_config { causal, fusion, group_size: g, block_rows, seed, ..config() };
        let mut out = vec![f32::NAN; p.out_len()];
        let mut lse = vec![f32::NAN; p.lse_len()];
        let shape = plan_shape(&cfg, &desc(&p.q, p.lq)).unwrap();
        let mut plan_buf = vec![u16::MAX; shape.num_entries];
        let t = p.descs(&mut out);
        expect(forward(&ctx, &cfg, &t, Some(&mut lse), Some(&mut plan_buf)), da_status::Ok, "");

        let c = core_config(&cfg);
        let mut want = vec![0f32; p.out_len()];
        let mut want_lse = vec![0f32; p.lse_len()];
        let want_plan = distr_attention(
            &c,
            &Tensor::new(&p.q, p.lq),
            &Tensor::new(&p.k, p.lk),
            &Tensor::new(&p.v, p.lv),
            &mut TensorMut::new(&mut want, p.lo),
            Some(&mut want_lse),
        )
        .unwrap();
        assert_eq!(out, want, "output, config {cfg:?}");
        assert_eq!(lse, want_lse);
        assert_eq!(plan_buf, want_plan.as_slice());
        assert_eq!(shape.blocks, 37usize.div_ceil(block_rows));
    }
}

#[test]
fn plan_then_attend_equals_forward_and_the_core_plan() {
    let ctx = Ctx::new();
    let p = Problem::new(1, 50, 50, 2, 1, 16, 16);
    let cfg = da_config { block_rows: 16, group_size: 4, ..config() };
    let q = desc(&p.q, p.lq);
    let n = plan_shape(&cfg, &q).unwrap().num_entries;
    // A longer buffer than needed: only the first `n` entries are written.
    let mut plan_buf = vec![u16::MAX; n + 5];
    expect(plan_into_buf(&ctx, &cfg, &q, &mut plan_buf), da_status::Ok, "");
    assert_eq!(&plan_buf[n..], &[u16::MAX; 5]);
    let core_plan = plan(&core_config(&cfg), &Tensor::new(&p.q, p.lq)).unwrap();
    assert_eq!(&plan_buf[..n], core_plan.as_slice());

    let mut a = vec![0f32; p.out_len()];
    let mut b = vec![0f32; p.out_len()];
    expect(attend(&ctx, &cfg, &plan_buf, &p.descs(&mut a), None), da_status::Ok, "");
    expect(forward(&ctx, &cfg, &p.descs(&mut b), None, None), da_status::Ok, "");
    assert_eq!(a, b);
    // A replayed plan of another grouping changes the result: the plan is used.
    let mut reversed = plan_buf[..n].to_vec();
    reversed.reverse();
    b.fill(0.0);
    expect(attend(&ctx, &cfg, &reversed, &p.descs(&mut b), None), da_status::Ok, "");
    assert_ne!(a, b);
    a.fill(0.0);
    let mut want = vec![0f32; p.out_len()];
    let reversed_plan = distr_attention_core::Plan::from_vec(
        distr_attention_core::PlanShape::new(&core_config(&cfg), &p.lq).unwrap(),
        reversed,
    )
    .unwrap();
    distr_attention_core::attention(
        &core_config(&cfg),
        &reversed_plan.as_ref(),
        &Tensor::new(&p.q, p.lq),
        &Tensor::new(&p.k, p.lk),
        &Tensor::new(&p.v, p.lv),
        &mut TensorMut::new(&mut want, p.lo),
        None,
    )
    .unwrap();
    assert_eq!(b, want);
}

#[test]
fn exact_attention_matches_the_core() {
    let ctx = Ctx::new();
    let p = Problem::new(2, 9, 13, 3, 3, 8, 5);
    let cfg = da_config { causal: 1, scale: 0.3, ..config() };
    let mut out = vec![0f32; p.out_len()];
    let mut lse = vec![0f32; p.lse_len()];
    expect(exact(&ctx, &cfg, &p.descs(&mut out), Some(&mut lse)), da_status::Ok, "");
    let mut want = vec![0f32; p.out_len()];
    let mut want_lse = vec![0f32; p.lse_len()];
    exact_attention(
        &core_config(&cfg),
        &Tensor::new(&p.q, p.lq),
        &Tensor::new(&p.k, p.lk),
        &Tensor::new(&p.v, p.lv),
        &mut TensorMut::new(&mut want, p.lo),
        Some(&mut want_lse),
    )
    .unwrap();
    assert_eq!(out, want);
    assert_eq!(lse, want_lse);
}

fn half_inputs_match<T: Element>() {
    let ctx = Ctx::new();
    let p = Problem::new(1, 33, 33, 2, 2, 16, 16);
    let conv = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    let (q, k, v) = (conv(&p.q), conv(&p.k), conv(&p.v));
    let cfg = da_config { block_rows: 8, group_size: 2, ..config() };
    let mut out = vec![0f32; p.out_len()];
    let t = [desc(&q, p.lq), desc(&k, p.lk), desc(&v, p.lv), desc_mut(&mut out, p.lo)];
    expect(forward(&ctx, &cfg, &t, None, None), da_status::Ok, "");
    let mut want = vec![0f32; p.out_len()];
    distr_attention(
        &core_config(&cfg),
        &Tensor::new(&q, p.lq),
        &Tensor::new(&k, p.lk),
        &Tensor::new(&v, p.lv),
        &mut TensorMut::new(&mut want, p.lo),
        None,
    )
    .unwrap();
    assert_eq!(out, want);
}

#[test]
fn f16_and_bf16_inputs_match_the_core() {
    half_inputs_match::<f16>();
    half_inputs_match::<bf16>();
}

#[test]
fn strided_views_and_per_head_group_sizes_match_the_core() {
    // Q, K and V interleaved in one buffer [b, n, 3, h, d]; the output strided
    // with a gap between heads.
    let (b, n, h, d) = (2, 21, 4, 16);
    let qkv = values(b * n * 3 * h * d, 5);
    let view = Layout {
        batch: b,
        seq: n,
        heads: h,
        dim: d,
        stride_batch: n * 3 * h * d,
        stride_seq: 3 * h * d,
        stride_head: d,
    };
    let base = |which: usize| &qkv[which * h * d..];
    let lo = Layout {
        stride_head: d + 3,
        stride_seq: h * (d + 3),
        stride_batch: n * h * (d + 3),
        ..dense(b, n, h, d)
    };
    let sizes = [1u32, 2, 4, 8];
    let cfg = da_config { group_sizes: sizes.as_ptr(), num_group_sizes: 4, block_rows: 5, ..config() };
    let ctx = Ctx::new();
    let mut out = vec![-7f32; lo.required_len(Operand::Output).unwrap()];
    let t = [desc(base(0), view), desc(base(1), view), desc(base(2), view), desc_mut(&mut out, lo)];
    expect(forward(&ctx, &cfg, &t, None, None), da_status::Ok, "");
    let per_head = [1usize, 2, 4, 8];
    let c = Config { group_sizes: GroupSizes::PerHead(&per_head), ..core_config(&cfg) };
    let mut want = vec![-7f32; out.len()];
    distr_attention(
        &c,
        &Tensor::new(base(0), view),
        &Tensor::new(base(1), view),
        &Tensor::new(base(2), view),
        &mut TensorMut::new(&mut want, lo),
        None,
    )
    .unwrap();
    assert_eq!(out, want);
    // The gaps of the output are not written.
    assert!(out.chunks_exact(d + 3).all(|c| c[d..] == [-7.0; 3]));
}

#[test]
fn projections_and_plan_shape_match_the_core() {
    let cfg = da_config { block_rows: 12, num_projections: 9, seed: 42, ..config() };
    let mut len = 0usize;
    // SAFETY: valid pointers.
    expect(unsafe { da_projections_len(&cfg, &mut len) }, da_status::Ok, "");
    assert_eq!(len, 12 * 9);
    let mut r = vec![0f32; len + 1];
    // SAFETY: `r` holds `len + 1` floats.
    expect(unsafe { da_projections(&cfg, r.as_mut_ptr(), r.len()) }, da_status::Ok, "");
    assert_eq!(&r[..len], projections(&core_config(&cfg)).unwrap().as_slice());
    assert_eq!(r[len], 0.0);

    let lq = dense(3, 25, 2, 8);
    // The data pointer is not needed for the shape.
    let shape = plan_shape(&cfg, &desc_raw(null(), da_dtype::F32, lq)).unwrap();
    assert_eq!(
        shape,
        da_plan_shape {
            batch: 3,
            heads: 2,
            blocks: 3,
            head_dim: 8,
            block_rows: 12,
            num_entries: 3 * 2 * 3 * 8
        }
    );
}

#[test]
fn context_reuse_across_sizes_and_seeds() {
    // The context caches projections per (seed, P, rows): every call must
    // still match a fresh computation.
    let ctx = Ctx::new();
    for (seed, block_rows, n, p) in
        [(1, 8, 40, 16), (2, 8, 40, 16), (1, 32, 40, 16), (1, 8, 5, 16), (1, 8, 40, 3)]
    {
        let pr = Problem::new(1, n, n, 2, 2, 32, 8);
        let cfg = da_config { seed, block_rows, num_projections: p, ..config() };
        let mut out = vec![0f32; pr.out_len()];
        expect(forward(&ctx, &cfg, &pr.descs(&mut out), None, None), da_status::Ok, "");
        let mut want = vec![0f32; pr.out_len()];
        distr_attention(
            &core_config(&cfg),
            &Tensor::new(&pr.q, pr.lq),
            &Tensor::new(&pr.k, pr.lk),
            &Tensor::new(&pr.v, pr.lv),
            &mut TensorMut::new(&mut want, pr.lo),
            None,
        )
        .unwrap();
        assert_eq!(out, want, "seed {seed} block_rows {block_rows} n {n} p {p}");
    }
}

// ---------------------------------------------------------------- statuses

#[test]
fn null_pointers() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let t = p.descs(&mut out);
    let cfg = config();
    let none = Ctx(null_mut());
    expect(forward(&none, &cfg, &t, None, None), da_status::NullPointer, "context is NULL");
    // SAFETY (every call below): the pointers that are not NULL are valid.
    unsafe {
        expect(
            da_forward(ctx.0, null(), &t[0], &t[1], &t[2], &t[3], null_mut(), 0, null_mut(), 0),
            da_status::NullPointer,
            "config is NULL",
        );
        expect(
            da_forward(ctx.0, &cfg, null(), &t[1], &t[2], &t[3], null_mut(), 0, null_mut(), 0),
            da_status::NullPointer,
            "q: tensor descriptor is NULL",
        );
        expect(
            da_exact_attention(ctx.0, &cfg, &t[0], &t[1], &t[2], null(), null_mut(), 0),
            da_status::NullPointer,
            "output: tensor descriptor is NULL",
        );
        expect(
            da_attention(ctx.0, &cfg, null(), 100, &t[0], &t[1], &t[2], &t[3], null_mut(), 0),
            da_status::NullPointer,
            "plan: pointer is NULL",
        );
        expect(da_context_new(null_mut()), da_status::NullPointer, "out is NULL");
        expect(
            da_config_default(null_mut(), size_of::<da_config>()),
            da_status::NullPointer,
            "config is NULL",
        );
        expect(da_get_plan_shape(&cfg, &t[0], null_mut()), da_status::NullPointer, "shape is NULL");
        expect(da_projections_len(&cfg, null_mut()), da_status::NullPointer, "len is NULL");
        expect(
            da_projections(&cfg, null_mut(), 5000),
            da_status::NullPointer,
            "projections: pointer is NULL",
        );
        expect(
            da_plan(ctx.0, &cfg, &t[0], null_mut(), 1000),
            da_status::NullPointer,
            "plan: pointer is NULL",
        );
    }
    let mut k = t;
    k[1].data = null();
    expect(forward(&ctx, &cfg, &k, None, None), da_status::NullPointer, "k: data pointer is NULL");
    let bad = da_config { num_group_sizes: 2, ..cfg };
    expect(forward(&ctx, &bad, &t, None, None), da_status::NullPointer, "group_sizes is NULL");
    // da_context_free(NULL) is a no-op.
    // SAFETY: NULL is allowed.
    unsafe { da_context_free(null_mut()) };
}

#[test]
fn misaligned_pointers() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len() + 1];
    let cfg = config();
    // One element more than needed, so that shifting by a byte stays inside the buffer.
    let q = [p.q.clone(), vec![0.0]].concat();
    let mut t = p.descs(&mut out);
    t[0].data = q.as_ptr().cast::<u8>().wrapping_add(1).cast();
    expect(forward(&ctx, &cfg, &t, None, None), da_status::MisalignedPointer, "q: data pointer");
    let mut t = p.descs(&mut out);
    t[3].data = out.as_ptr().cast::<u8>().wrapping_add(2).cast();
    expect(forward(&ctx, &cfg, &t, None, None), da_status::MisalignedPointer, "output: data pointer");
    // Plan and lse buffers.
    let t = p.descs(&mut out);
    let n = plan_shape(&cfg, &t[0]).unwrap().num_entries;
    let plan_buf = vec![0u16; n + 1];
    let odd = plan_buf.as_ptr().cast::<u8>().wrapping_add(1).cast::<u16>();
    // SAFETY: the misaligned pointer is rejected before it is read.
    let s = unsafe { da_attention(ctx.0, &cfg, odd, n, &t[0], &t[1], &t[2], &t[3], null_mut(), 0) };
    expect(s, da_status::MisalignedPointer, "plan: pointer");
    let mut lse = vec![0f32; p.lse_len() + 1];
    let odd = lse.as_mut_ptr().cast::<u8>().wrapping_add(1).cast::<f32>();
    // SAFETY: as above.
    let s = unsafe { da_exact_attention(ctx.0, &cfg, &t[0], &t[1], &t[2], &t[3], odd, p.lse_len()) };
    expect(s, da_status::MisalignedPointer, "lse: pointer");
    // f16 needs only 2-byte alignment: an f16 tensor at an even offset is fine.
    let q16: Vec<f16> = [0.0].iter().chain(&p.q).map(|&x| f16::from_f32(x)).collect();
    let k16: Vec<f16> = p.k.iter().map(|&x| f16::from_f32(x)).collect();
    let v16: Vec<f16> = p.v.iter().map(|&x| f16::from_f32(x)).collect();
    let t = [desc(&q16[1..], p.lq), desc(&k16, p.lk), desc(&v16, p.lv), desc_mut(&mut out, p.lo)];
    expect(forward(&ctx, &cfg, &t, None, None), da_status::Ok, "");
}

#[test]
fn invalid_arguments() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let cfg = config();
    let mut t = p.descs(&mut out);
    t[2].dtype = 7;
    expect(forward(&ctx, &cfg, &t, None, None), da_status::InvalidArgument, "v: dtype 7");
    let t = p.descs(&mut out);
    expect(
        forward(&ctx, &da_config { fusion: 9, ..cfg }, &t, None, None),
        da_status::InvalidArgument,
        "fusion 9",
    );
    expect(
        forward(&ctx, &da_config { struct_size: 8, ..cfg }, &t, None, None),
        da_status::InvalidArgument,
        "struct_size",
    );
    expect(
        forward(&ctx, &da_config { struct_size: 1 << 40, ..cfg }, &t, None, None),
        da_status::InvalidArgument,
        "implausible",
    );
    let mut c = cfg;
    // SAFETY: `c` is writable; the size is rejected before anything is written.
    let s = unsafe { da_config_default(&mut c, 4) };
    expect(s, da_status::InvalidArgument, "struct_size 4");
}

#[test]
fn bad_configs() {
    let ctx = Ctx::new();
    let p = Problem::small(); // d = 16, 2 query heads
    let mut out = vec![0f32; p.out_len()];
    let t = p.descs(&mut out);
    let cfg = config();
    let run = |c: da_config| forward(&ctx, &c, &t, None, None);
    expect(run(da_config { block_rows: 0, ..cfg }), da_status::BadConfig, "block_rows");
    expect(run(da_config { num_projections: 0, ..cfg }), da_status::BadConfig, "num_projections");
    expect(run(da_config { num_projections: 33, ..cfg }), da_status::BadConfig, "num_projections");
    expect(run(da_config { scale: -1.0, ..cfg }), da_status::BadConfig, "scale");
    expect(run(da_config { scale: f32::INFINITY, ..cfg }), da_status::BadConfig, "scale");
    expect(run(da_config { group_size: 3, ..cfg }), da_status::BadConfig, "group size 3");
    expect(run(da_config { group_size: 0, ..cfg }), da_status::BadConfig, "group size 0");
    let sizes = [2u32, 5, 2];
    expect(
        run(da_config { group_sizes: sizes.as_ptr(), num_group_sizes: 3, ..cfg }),
        da_status::BadConfig,
        "expected one per query head (2), got 3",
    );
    expect(
        run(da_config { group_sizes: sizes.as_ptr(), num_group_sizes: 2, ..cfg }),
        da_status::BadConfig,
        "group size 5 of query head 1",
    );
    // NaN scale means the default; the plan functions check their parameters too.
    expect(run(da_config { scale: f32::NAN, ..cfg }), da_status::Ok, "");
    assert_eq!(plan_shape(&da_config { block_rows: 0, ..cfg }, &t[0]), Err(da_status::BadConfig));
}

#[test]
fn invalid_shapes() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let cfg = config();
    let mut t = p.descs(&mut out);
    t[1].seq = 0;
    expect(forward(&ctx, &cfg, &t, None, None), da_status::InvalidShape, "k: dimension seq is zero");
    let mut t = p.descs(&mut out);
    t[3].heads = 0;
    expect(forward(&ctx, &cfg, &t, None, None), da_status::InvalidShape, "output: dimension heads is zero");
    // A head dimension above the u16 range of plan entries.
    let big = dense(1, 1, 1, 70_000);
    let x = vec![0.5f32; 70_000];
    assert_eq!(plan_shape(&cfg, &desc(&x, big)), Err(da_status::InvalidShape));
    assert!(message().contains("head_dim 70000 exceeds"), "{}", message());
}

#[test]
fn shape_mismatches() {
    let ctx = Ctx::new();
    let cfg = config();
    let p = Problem::new(2, 20, 20, 2, 2, 16, 16);
    let mut out = vec![0f32; p.out_len()];
    type Edit = fn(&mut [da_tensor; 4]);
    let cases: [(Edit, &str); 5] = [
        (|t| t[1].head_dim = 8, "k: dimension head_dim is 8, expected 16"),
        (|t| t[2].seq = 19, "v: dimension seq is 19, expected 20"),
        (|t| t[1].batch = 1, "k: dimension batch is 1, expected 2"),
        (|t| t[3].head_dim = 8, "output: dimension head_dim is 8, expected 16"),
        // Three query heads over the rows of two (within Q's buffer): not a
        // multiple of the two KV heads.
        (
            |t| {
                t[0].heads = 3;
                t[0].seq = 10;
            },
            "query heads (3) must be a multiple of key/value heads (2)",
        ),
    ];
    for (edit, needle) in cases {
        let mut t = p.descs(&mut out);
        edit(&mut t);
        expect(forward(&ctx, &cfg, &t, None, None), da_status::ShapeMismatch, needle);
    }
}

#[test]
fn size_overflows() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let cfg = config();
    // Overflow of the element extent (no memory is touched: the extent is
    // rejected first).
    let mut t = p.descs(&mut out);
    t[0].batch = 3;
    t[0].stride_batch = usize::MAX / 2;
    expect(forward(&ctx, &cfg, &t, None, None), da_status::SizeOverflow, "q: size or offset overflows");
    // An element extent that fits usize but not in bytes.
    let mut t = p.descs(&mut out);
    t[1].batch = 2;
    t[1].stride_batch = usize::MAX / 4;
    expect(forward(&ctx, &cfg, &t, None, None), da_status::SizeOverflow, "exceed the address space");
    // Valid in elements and bytes, but past the end of the address space.
    let mut t = p.descs(&mut out);
    t[2].data = (usize::MAX - 64) as *const c_void;
    t[2].data = ((t[2].data as usize) & !3) as *const c_void;
    expect(forward(&ctx, &cfg, &t, None, None), da_status::SizeOverflow, "exceed the address space");
}

#[test]
fn buffers_too_small() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let cfg = config();
    let t = p.descs(&mut out);
    let n = plan_shape(&cfg, &t[0]).unwrap().num_entries;
    let mut plan_buf = vec![0u16; n];
    expect(
        plan_into_buf(&ctx, &cfg, &t[0], &mut plan_buf[..n - 1]),
        da_status::BufferTooSmall,
        "plan: buffer holds",
    );
    expect(plan_into_buf(&ctx, &cfg, &t[0], &mut plan_buf), da_status::Ok, "");
    expect(attend(&ctx, &cfg, &plan_buf[..n - 1], &t, None), da_status::BufferTooSmall, "plan: buffer holds");
    let mut lse = vec![0f32; p.lse_len() - 1];
    expect(
        exact(&ctx, &cfg, &t, Some(&mut lse)),
        da_status::BufferTooSmall,
        "lse: buffer holds 39 elements, 40 needed",
    );
    let mut short = vec![0u16; n - 1];
    expect(forward(&ctx, &cfg, &t, None, Some(&mut short)), da_status::BufferTooSmall, "plan: buffer holds");
    let mut r = vec![0f32; 10];
    // SAFETY: `r` holds 10 floats.
    let s = unsafe { da_projections(&cfg, r.as_mut_ptr(), r.len()) };
    expect(s, da_status::BufferTooSmall, "projections: buffer holds 10 elements, 1024 needed");
}

#[test]
fn overlapping_buffers() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let cfg = config();
    // The output written over Q.
    let t = [desc(&p.q, p.lq), desc(&p.k, p.lk), desc(&p.v, p.lv), desc(&p.q, p.lo)];
    expect(
        forward(&ctx, &cfg, &t, None, None),
        da_status::OverlappingBuffers,
        "output: the buffer written overlaps the buffer of q",
    );
    // lse inside the output.
    let mut out = vec![0f32; p.out_len() + p.lse_len()];
    let t = p.descs(&mut out);
    let lse = out.as_mut_ptr().wrapping_add(10);
    // SAFETY: `lse` has `lse_len` floats inside `out` (the library rejects the overlap).
    let s = unsafe { da_exact_attention(ctx.0, &cfg, &t[0], &t[1], &t[2], &t[3], lse, p.lse_len()) };
    expect(s, da_status::OverlappingBuffers, "overlaps the buffer of lse");
    // An output whose strides make heads share memory.
    let mut out = vec![0f32; p.out_len()];
    let mut t = p.descs(&mut out);
    t[3].stride_head = 0;
    expect(
        forward(&ctx, &cfg, &t, None, None),
        da_status::OverlappingBuffers,
        "output: strides make distinct elements overlap",
    );
    // A plan written over Q, and a plan output over the output.
    let t = p.descs(&mut out);
    let n = plan_shape(&cfg, &t[0]).unwrap().num_entries;
    // SAFETY: Q's buffer is large enough for `n` u16 (checked), and the overlap is rejected before writing.
    assert!(n * 2 <= p.q.len() * 4);
    let s = unsafe { da_plan(ctx.0, &cfg, &t[0], p.q.as_ptr() as *mut u16, n) };
    expect(s, da_status::OverlappingBuffers, "plan: the buffer written overlaps the buffer of q");
    // SAFETY: as above, over the output.
    let s = unsafe {
        da_forward(ctx.0, &cfg, &t[0], &t[1], &t[2], &t[3], null_mut(), 0, t[3].data as *mut u16, n)
    };
    expect(s, da_status::OverlappingBuffers, "overlaps the buffer of plan");
    // The plan read by da_attention may not be inside the output either.
    let tb = p.descs(&mut out);
    // SAFETY: plan over the output's memory, rejected before any read.
    let s = unsafe {
        da_attention(ctx.0, &cfg, tb[3].data.cast(), n, &tb[0], &tb[1], &tb[2], &tb[3], null_mut(), 0)
    };
    expect(s, da_status::OverlappingBuffers, "output: the buffer written overlaps the buffer of plan");
    // Inputs may share memory: Q = K = V.
    let same = [desc(&p.q, p.lq), desc(&p.q, p.lq), desc(&p.q, p.lq), desc_mut(&mut out, p.lo)];
    expect(forward(&ctx, &cfg, &same, None, None), da_status::Ok, "");
}

#[test]
fn non_finite_inputs() {
    let ctx = Ctx::new();
    let mut p = Problem::small();
    p.k[17] = f32::NAN;
    let cfg = config();
    let mut out = vec![0f32; p.out_len()];
    expect(forward(&ctx, &cfg, &p.descs(&mut out), None, None), da_status::NonFinite, "k: non-finite value");
    p.k[17] = 0.0;
    p.q[3] = f32::INFINITY;
    let mut plan_buf = vec![0u16; 1000];
    expect(
        plan_into_buf(&ctx, &cfg, &desc(&p.q, p.lq), &mut plan_buf),
        da_status::NonFinite,
        "q: non-finite value",
    );
}

#[test]
fn bad_plans() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let cfg = config();
    let mut out = vec![0f32; p.out_len()];
    let t = p.descs(&mut out);
    let n = plan_shape(&cfg, &t[0]).unwrap().num_entries;
    let mut plan_buf = vec![0u16; n];
    expect(plan_into_buf(&ctx, &cfg, &t[0], &mut plan_buf), da_status::Ok, "");
    plan_buf[20] = plan_buf[21]; // block 1 repeats a column
    expect(attend(&ctx, &cfg, &plan_buf, &t, None), da_status::BadPlan, "plan: block 1 is not a permutation");
    plan_buf[20] = 16; // out of range
    expect(attend(&ctx, &cfg, &plan_buf, &t, None), da_status::BadPlan, "not a permutation");
}

#[test]
fn unsupported_combinations() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let cfg = config();
    let mut out = vec![0f32; p.out_len()];
    let mut t = p.descs(&mut out);
    t[3].dtype = da_dtype::F16 as u32;
    expect(
        forward(&ctx, &cfg, &t, None, None),
        da_status::Unsupported,
        "output: dtype is f16, outputs must be f32",
    );
    let k16: Vec<f16> = p.k.iter().map(|&x| f16::from_f32(x)).collect();
    let mut t = p.descs(&mut out);
    t[1] = desc(&k16, p.lk);
    expect(
        forward(&ctx, &cfg, &t, None, None),
        da_status::Unsupported,
        "k: dtype is f16, must equal q's dtype f32",
    );
    // Similarity grouping needs powers of two: G = 6 divides the head dimension 12
    // (a bad config for LSH it is not), but the mode cannot use it.
    let p12 = Problem::new(1, 8, 8, 2, 2, 12, 4);
    let mut out12 = vec![0f32; p12.out_len()];
    let similarity = da_config { grouping: da_grouping::Similarity as u32, group_size: 6, ..cfg };
    expect(
        forward(&ctx, &similarity, &p12.descs(&mut out12), None, None),
        da_status::Unsupported,
        "group size 6 is not supported",
    );
    expect(
        forward(
            &ctx,
            &da_config { grouping: da_grouping::Lsh as u32, ..similarity },
            &p12.descs(&mut out12),
            None,
            None,
        ),
        da_status::Ok,
        "",
    );
}

#[test]
fn config_growth() {
    // A caller compiled against a newer header: a larger struct whose extra
    // fields are zero is accepted; a nonzero extra field is not understood.
    #[repr(C)]
    struct Newer {
        base: da_config,
        extra: u64,
    }
    let mut c = Newer { base: config(), extra: 0xdead };
    // SAFETY: `c` holds `size_of::<Newer>()` bytes.
    expect(unsafe { da_config_default(&mut c.base, size_of::<Newer>()) }, da_status::Ok, "");
    assert_eq!(c.extra, 0, "da_config_default zeroes the fields it does not know");
    assert_eq!(c.base.struct_size, size_of::<Newer>());
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let t = p.descs(&mut out);
    expect(forward(&ctx, &c.base, &t, None, None), da_status::Ok, "");
    c.extra = 1;
    expect(forward(&ctx, &c.base, &t, None, None), da_status::Unsupported, "a field of a newer header");
}

#[test]
fn allocation_failure() {
    // V and the output claim 2^44 elements each. The descriptors are valid in
    // arithmetic terms, the scratch for such a head dimension cannot be
    // allocated, and the call fails before any tensor memory is touched, so
    // the two pointers are never dereferenced.
    let ctx = Ctx::new();
    let cfg = config();
    let q = values(8, 1);
    let dv = 1usize << 44;
    let lq = dense(1, 1, 1, 8);
    let lv = dense(1, 1, 1, dv);
    let t = [
        desc(&q, lq),
        desc(&q, lq),
        desc_raw((1usize << 50) as *const c_void, da_dtype::F32, lv),
        desc_raw((1usize << 52) as *const c_void, da_dtype::F32, lv),
    ];
    expect(exact(&ctx, &cfg, &t, None), da_status::AllocationFailed, "scratch: could not allocate");
    // The context is still usable.
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    expect(forward(&ctx, &cfg, &p.descs(&mut out), None, None), da_status::Ok, "");
}

#[test]
fn panics_are_caught_at_the_boundary() {
    let s = boundary(|| panic!("boom {}", 42));
    assert_eq!(s, da_status::Panic);
    assert!(message().contains("panicked: boom 42"), "{}", message());
    let s = boundary(|| Err(Failure::new(da_status::BadPlan, "x")));
    assert_eq!((s, message().as_str()), (da_status::BadPlan, "x"));
    assert_eq!(boundary(|| Ok(())), da_status::Ok);
    assert_eq!(message(), "");
}

#[test]
fn no_buffer_is_written_on_error() {
    let ctx = Ctx::new();
    let mut p = Problem::small();
    p.v[5] = f32::NEG_INFINITY;
    let cfg = config();
    let mut out = vec![-3f32; p.out_len()];
    let mut lse = vec![-3f32; p.lse_len()];
    let n = plan_shape(&cfg, &desc(&p.q, p.lq)).unwrap().num_entries;
    let mut plan_buf = vec![777u16; n];
    let s = forward(&ctx, &cfg, &p.descs(&mut out), Some(&mut lse), Some(&mut plan_buf));
    expect(s, da_status::NonFinite, "v: non-finite");
    assert!(out.iter().all(|&x| x == -3.0));
    assert!(lse.iter().all(|&x| x == -3.0));
    assert!(plan_buf.iter().all(|&x| x == 777));
}

#[test]
fn last_error_contract() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let mut t = p.descs(&mut out);
    t[0].seq = 0;
    let cfg = config();
    let s = forward(&ctx, &cfg, &t, None, None);
    assert_eq!(s, da_status::InvalidShape);
    let msg = message();
    assert_eq!(msg, "q: dimension seq is zero");
    // The copy form, snprintf-like.
    let mut buf = [0x55 as core::ffi::c_char; 6];
    // SAFETY: `buf` holds 6 bytes.
    let n = unsafe { da_last_error_copy(buf.as_mut_ptr(), buf.len()) };
    assert_eq!(n, msg.len());
    // SAFETY: NUL-terminated by da_last_error_copy.
    assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap(), &msg[..5]);
    // SAFETY: NULL with length 0 only measures.
    assert_eq!(unsafe { da_last_error_copy(null_mut(), 0) }, msg.len());
    // Status strings and versions leave the message alone.
    let _ = da_status_string(3);
    let _ = da_version();
    assert_eq!(message(), msg);
    // Messages are per thread.
    std::thread::spawn(|| assert_eq!(message(), "")).join().unwrap();
    // A successful call clears it.
    expect(forward(&ctx, &cfg, &p.descs(&mut out), None, None), da_status::Ok, "");
}

#[test]
fn status_strings_and_version() {
    let mut seen = std::collections::HashSet::new();
    for (i, s) in crate::status::ALL_STATUSES.iter().enumerate() {
        assert_eq!(*s as u32, i as u32);
        // SAFETY: static NUL-terminated strings.
        let text = unsafe { CStr::from_ptr(da_status_string(i as u32)) }.to_str().unwrap();
        assert!(!text.is_empty() && seen.insert(text), "{text}");
    }
    // SAFETY: as above.
    assert_eq!(unsafe { CStr::from_ptr(da_status_string(20)) }.to_str().unwrap(), "unknown status");
    assert_eq!(unsafe { CStr::from_ptr(da_status_string(u32::MAX)) }.to_str().unwrap(), "unknown status");
    assert_eq!(unsafe { CStr::from_ptr(da_version()) }.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    let (major, minor, patch): (u32, u32, u32) = (
        env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap(),
        env!("CARGO_PKG_VERSION_MINOR").parse().unwrap(),
        env!("CARGO_PKG_VERSION_PATCH").parse().unwrap(),
    );
    assert_eq!(da_version_number(), major * 10000 + minor * 100 + patch);
}

#[test]
fn abi_layout() {
    // The layout the header, the Python module and other bindings rely on (LP64).
    if size_of::<usize>() == 8 {
        assert_eq!(size_of::<da_config>(), 64);
        assert_eq!(core::mem::offset_of!(da_config, seed), 32);
        assert_eq!(core::mem::offset_of!(da_config, scale), 56);
        assert_eq!(size_of::<da_tensor>(), 72);
        assert_eq!(size_of::<da_plan_shape>(), 48);
    }
    assert_eq!(size_of::<da_status>(), 4);
}

mod backward;
mod budget;
mod cuda;
mod grouping;
mod table;
