//! Grouping modes through the C ABI: the config field, `da_plan`,
//! `da_plan_with_keys` and the one-shot forward pass in every mode, the
//! config's backward compatibility, and the status of every core error.

use distr_attention_core::{attention, plan_with_keys, Dim, Error, Plan};

use super::*;

fn plan_keys(ctx: &Ctx, cfg: &da_config, q: &da_tensor, k: &da_tensor, out: &mut [u16]) -> da_status {
    // SAFETY: every pointer addresses the extent its descriptor or length says.
    unsafe { da_plan_with_keys(ctx.0, cfg, q, k, out.as_mut_ptr(), out.len()) }
}

fn with_grouping(grouping: da_grouping, cfg: da_config) -> da_config {
    da_config { grouping: grouping as u32, ..cfg }
}

/// The core's plan with keys and attention on it, for a problem and config.
fn core_forward(p: &Problem, cfg: &Config<'_>) -> (Vec<f32>, Vec<f32>, Plan) {
    let (q, k, v) = (Tensor::new(&p.q, p.lq), Tensor::new(&p.k, p.lk), Tensor::new(&p.v, p.lv));
    let plan = plan_with_keys(cfg, &q, &k).unwrap();
    let mut out = vec![0f32; p.out_len()];
    let mut lse = vec![0f32; p.lse_len()];
    attention(cfg, &plan.as_ref(), &q, &k, &v, &mut TensorMut::new(&mut out, p.lo), Some(&mut lse)).unwrap();
    (out, lse, plan)
}

#[test]
fn forward_matches_the_core_in_every_grouping_mode() {
    let ctx = Ctx::new();
    let p = Problem::new(2, 45, 37, 4, 2, 32, 24);
    let sizes = [1u32, 2, 4, 8];
    let sizes_usize = [1usize, 2, 4, 8];
    for grouping in [da_grouping::Lsh, da_grouping::Similarity, da_grouping::KeyWeighted] {
        for (per_head, causal, fusion) in [(false, 0, 0), (true, 1, 1), (false, 1, 0)] {
            let mut cfg = with_grouping(grouping, da_config { block_rows: 16, causal, fusion, ..config() });
            let mut c = core_config(&cfg);
            if per_head {
                cfg.group_sizes = sizes.as_ptr();
                cfg.num_group_sizes = 4;
                c.group_sizes = GroupSizes::PerHead(&sizes_usize);
            }
            let n = plan_shape(&cfg, &desc(&p.q, p.lq)).unwrap().num_entries;
            let mut out = vec![f32::NAN; p.out_len()];
            let mut lse = vec![f32::NAN; p.lse_len()];
            let mut plan_buf = vec![u16::MAX; n];
            let t = p.descs(&mut out);
            expect(forward(&ctx, &cfg, &t, Some(&mut lse), Some(&mut plan_buf)), da_status::Ok, "");
            let (want, want_lse, want_plan) = core_forward(&p, &c);
            assert_eq!(out, want, "{grouping:?} per_head {per_head} causal {causal}");
            assert_eq!(lse, want_lse);
            assert_eq!(plan_buf, want_plan.as_slice());

            // da_plan_with_keys gives the same plan, and da_attention on it the same output.
            let mut again = vec![0u16; n];
            expect(plan_keys(&ctx, &cfg, &t[0], &t[1], &mut again), da_status::Ok, "");
            assert_eq!(again, plan_buf);
            let mut replay = vec![0f32; p.out_len()];
            expect(attend(&ctx, &cfg, &again, &p.descs(&mut replay), None), da_status::Ok, "");
            assert_eq!(replay, want);
        }
    }
}

#[test]
fn the_modes_give_different_plans_and_similarity_is_more_accurate_here() {
    // Q whose column pairs (2t, 2t+1) are nearly equal: exact similarity pairs
    // them, LSH on 16 projections need not.
    let ctx = Ctx::new();
    let mut p = Problem::new(1, 64, 64, 2, 2, 32, 16);
    for (i, x) in p.q.iter_mut().enumerate() {
        let base = values(1, i & !1)[0];
        *x = base + 0.01 * values(1, 7 * i + 3)[0];
    }
    let mut exact_out = vec![0f32; p.out_len()];
    expect(exact(&ctx, &config(), &p.descs(&mut exact_out), None), da_status::Ok, "");
    let mut errors = Vec::new();
    let mut plans = Vec::new();
    for grouping in [da_grouping::Lsh, da_grouping::Similarity, da_grouping::KeyWeighted] {
        let cfg = with_grouping(grouping, config());
        let n = plan_shape(&cfg, &desc(&p.q, p.lq)).unwrap().num_entries;
        let mut out = vec![0f32; p.out_len()];
        let mut plan_buf = vec![0u16; n];
        expect(forward(&ctx, &cfg, &p.descs(&mut out), None, Some(&mut plan_buf)), da_status::Ok, "");
        let num: f64 = out.iter().zip(&exact_out).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = exact_out.iter().map(|b| (*b as f64).powi(2)).sum();
        errors.push((num / den).sqrt());
        plans.push(plan_buf);
    }
    assert_ne!(plans[0], plans[1]);
    // Similarity pairs every (2t, 2t+1): each group of the plan is such a pair.
    for block in plans[1].chunks(32) {
        for pair in block.chunks(2) {
            assert_eq!(pair[0] / 2, pair[1] / 2, "similarity plan block {block:?}");
        }
    }
    assert!(errors[1] < errors[0], "similarity {} vs LSH {}", errors[1], errors[0]);
}

#[test]
fn da_plan_in_the_similarity_modes() {
    let ctx = Ctx::new();
    let p = Problem::new(1, 30, 30, 2, 1, 16, 8);
    let q = desc(&p.q, p.lq);
    let cfg = with_grouping(da_grouping::Similarity, da_config { block_rows: 8, group_size: 4, ..config() });
    let n = plan_shape(&cfg, &q).unwrap().num_entries;
    let mut buf = vec![u16::MAX; n + 3];
    expect(plan_into_buf(&ctx, &cfg, &q, &mut buf), da_status::Ok, "");
    let want = plan(&core_config(&cfg), &Tensor::new(&p.q, p.lq)).unwrap();
    assert_eq!(&buf[..n], want.as_slice());
    assert_eq!(&buf[n..], &[u16::MAX; 3], "only the plan's entries are written");
    // The similarity plan depends on G (an LSH plan does not).
    let mut g2 = vec![0u16; n];
    expect(plan_into_buf(&ctx, &da_config { group_size: 2, ..cfg }, &q, &mut g2), da_status::Ok, "");
    assert_ne!(&g2[..], &buf[..n]);
    let lsh = with_grouping(da_grouping::Lsh, cfg);
    let (mut a, mut b) = (vec![0u16; n], vec![0u16; n]);
    expect(plan_into_buf(&ctx, &lsh, &q, &mut a), da_status::Ok, "");
    expect(plan_into_buf(&ctx, &da_config { group_size: 2, ..lsh }, &q, &mut b), da_status::Ok, "");
    assert_eq!(a, b);
    // Per-head sizes are read in the similarity modes, and checked.
    let sizes = [2u32, 8];
    let per_head = da_config { group_sizes: sizes.as_ptr(), num_group_sizes: 2, ..cfg };
    expect(plan_into_buf(&ctx, &per_head, &q, &mut a), da_status::Ok, "");
    let su = [2usize, 8];
    let c = Config { group_sizes: GroupSizes::PerHead(&su), ..core_config(&cfg) };
    assert_eq!(a, plan(&c, &Tensor::new(&p.q, p.lq)).unwrap().as_slice());
    let bad = da_config { group_sizes: sizes.as_ptr(), num_group_sizes: 1, ..cfg };
    expect(
        plan_into_buf(&ctx, &bad, &q, &mut a),
        da_status::BadConfig,
        "expected one per query head (2), got 1",
    );
    // ... but not in LSH mode, where they do not matter (a wild pointer is never read).
    let wild = da_config { group_sizes: 8usize as *const u32, num_group_sizes: 1, ..lsh };
    expect(plan_into_buf(&ctx, &wild, &q, &mut a), da_status::Ok, "");
}

#[test]
fn key_weighted_plans_need_the_keys() {
    let ctx = Ctx::new();
    let p = Problem::new(1, 20, 24, 2, 2, 16, 16);
    let q = desc(&p.q, p.lq);
    let cfg = with_grouping(da_grouping::KeyWeighted, config());
    let n = plan_shape(&cfg, &q).unwrap().num_entries;
    let mut buf = vec![7u16; n];
    expect(
        plan_into_buf(&ctx, &cfg, &q, &mut buf),
        da_status::Unsupported,
        "key-weighted grouping needs the keys: use plan_with_keys (from C: da_plan_with_keys",
    );
    assert!(buf.iter().all(|&x| x == 7));
    let k = desc(&p.k, p.lk);
    expect(plan_keys(&ctx, &cfg, &q, &k, &mut buf), da_status::Ok, "");
    let c = core_config(&cfg);
    let want = plan_with_keys(&c, &Tensor::new(&p.q, p.lq), &Tensor::new(&p.k, p.lk)).unwrap();
    assert_eq!(buf, want.as_slice());
    // The keys matter: other keys, another plan.
    let other: Vec<f32> = p.k.iter().enumerate().map(|(i, x)| x * (1.0 + (i % 16) as f32)).collect();
    let mut buf2 = vec![0u16; n];
    expect(plan_keys(&ctx, &cfg, &q, &desc(&other, p.lk), &mut buf2), da_status::Ok, "");
    assert_ne!(buf, buf2);
}

#[test]
fn plan_with_keys_statuses() {
    let ctx = Ctx::new();
    let mut p = Problem::new(1, 20, 24, 2, 1, 16, 16);
    let cfg = config();
    let q = desc(&p.q, p.lq);
    let n = plan_shape(&cfg, &q).unwrap().num_entries;
    let mut buf = vec![0u16; n];
    // SAFETY (the raw calls): pointers valid or NULL.
    let s = unsafe { da_plan_with_keys(ctx.0, &cfg, &q, null(), buf.as_mut_ptr(), n) };
    expect(s, da_status::NullPointer, "k: tensor descriptor is NULL");
    let s = unsafe { da_plan_with_keys(null_mut(), &cfg, &q, &desc(&p.k, p.lk), buf.as_mut_ptr(), n) };
    expect(s, da_status::NullPointer, "context is NULL");
    let k16: Vec<f16> = p.k.iter().map(|&x| f16::from_f32(x)).collect();
    expect(
        plan_keys(&ctx, &cfg, &q, &desc(&k16, p.lk), &mut buf),
        da_status::Unsupported,
        "k: dtype is f16, must equal q's dtype f32",
    );
    let short_k = Layout { dim: 8, ..p.lk };
    expect(
        plan_keys(&ctx, &cfg, &q, &desc(&p.k, short_k), &mut buf),
        da_status::ShapeMismatch,
        "k: dimension head_dim is 8, expected 16",
    );
    let three = Layout { heads: 3, stride_seq: 48, stride_batch: 48 * 24, ..p.lk };
    let k3 = values(48 * 24, 9);
    expect(
        plan_keys(&ctx, &cfg, &q, &desc(&k3, three), &mut buf),
        da_status::ShapeMismatch,
        "query heads (2) must be a multiple of key/value heads (3)",
    );
    // The plan may not be written over the keys.
    let kd = desc(&p.k, p.lk);
    let s = unsafe { da_plan_with_keys(ctx.0, &cfg, &q, &kd, p.k.as_ptr() as *mut u16, n) };
    expect(s, da_status::OverlappingBuffers, "plan: the buffer written overlaps the buffer of k");
    expect(
        plan_keys(&ctx, &cfg, &q, &kd, &mut buf[..n - 1]),
        da_status::BufferTooSmall,
        "plan: buffer holds",
    );
    // K is validated in every mode, LSH included.
    p.k[5] = f32::NAN;
    buf.fill(9);
    expect(
        plan_keys(&ctx, &cfg, &q, &desc(&p.k, p.lk), &mut buf),
        da_status::NonFinite,
        "k: non-finite value",
    );
    assert!(buf.iter().all(|&x| x == 9), "nothing written on error");
    // Powers of two only in the key-weighted mode.
    let kw = with_grouping(da_grouping::KeyWeighted, cfg);
    p.k[5] = 0.0;
    let p12 = Problem::new(1, 8, 8, 2, 1, 12, 4);
    let q12 = desc(&p12.q, p12.lq);
    let mut b12 = vec![0u16; plan_shape(&kw, &q12).unwrap().num_entries];
    expect(
        plan_keys(&ctx, &da_config { group_size: 6, ..kw }, &q12, &desc(&p12.k, p12.lk), &mut b12),
        da_status::Unsupported,
        "group size 6 is not supported",
    );
    expect(
        plan_keys(&ctx, &da_config { group_size: 5, ..kw }, &q12, &desc(&p12.k, p12.lk), &mut b12),
        da_status::BadConfig,
        "group size 5 of query head 0",
    );
}

#[test]
fn grouping_values_and_config_compatibility() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let mut out = vec![0f32; p.out_len()];
    let t = p.descs(&mut out);
    assert_eq!(config().grouping, da_grouping::Lsh as u32, "the default is the paper's LSH");
    expect(
        forward(&ctx, &da_config { grouping: 3, ..config() }, &t, None, None),
        da_status::InvalidArgument,
        "config: grouping 3 is not a da_grouping value",
    );
    let n = plan_shape(&config(), &t[0]).unwrap().num_entries;
    let mut buf = vec![0u16; n];
    expect(
        plan_into_buf(&ctx, &da_config { grouping: u32::MAX, ..config() }, &t[0], &mut buf),
        da_status::InvalidArgument,
        "grouping 4294967295",
    );

    // A program built against the first header: the same 64 bytes, with a
    // zero `reserved` where `grouping` now is, runs LSH exactly as before.
    #[repr(C)]
    struct ConfigV1 {
        struct_size: usize,
        block_rows: usize,
        group_sizes: *const u32,
        num_group_sizes: usize,
        seed: u64,
        group_size: u32,
        num_projections: u32,
        fusion: u32,
        causal: u32,
        scale: f32,
        reserved: u32,
    }
    assert_eq!(size_of::<ConfigV1>(), size_of::<da_config>());
    assert_eq!(core::mem::offset_of!(ConfigV1, reserved), core::mem::offset_of!(da_config, grouping));
    let v1 = ConfigV1 {
        struct_size: size_of::<ConfigV1>(),
        block_rows: 8,
        group_sizes: null(),
        num_group_sizes: 0,
        seed: 3,
        group_size: 4,
        num_projections: 16,
        fusion: 0,
        causal: 1,
        scale: 0.0,
        reserved: 0,
    };
    let mut old = vec![0f32; p.out_len()];
    let v1_ptr = (&v1 as *const ConfigV1).cast::<da_config>();
    // SAFETY: `v1` has the layout and size of a da_config.
    let s = unsafe {
        da_forward(ctx.0, v1_ptr, &t[0], &t[1], &t[2], &p.descs(&mut old)[3], null_mut(), 0, null_mut(), 0)
    };
    expect(s, da_status::Ok, "");
    let now = da_config { block_rows: 8, seed: 3, group_size: 4, causal: 1, ..config() };
    expect(forward(&ctx, &now, &p.descs(&mut out), None, None), da_status::Ok, "");
    assert_eq!(old, out);
}

#[test]
fn every_core_error_has_its_status() {
    use distr_attention_core::Operand as O;
    let cases: [(Error, da_status); 21] = [
        (Error::InvalidBlockRows { got: 0 }, da_status::BadConfig),
        (Error::InvalidNumProjections { got: 0 }, da_status::BadConfig),
        (Error::InvalidScale { got: -1.0 }, da_status::BadConfig),
        (Error::InvalidGroupSize { head: 0, group_size: 3, head_dim: 8 }, da_status::BadConfig),
        (Error::GroupSizesLength { expected: 2, got: 1 }, da_status::BadConfig),
        (Error::EmptyDimension { operand: O::Q, dim: Dim::Seq }, da_status::InvalidShape),
        (
            Error::ShapeMismatch { operand: O::K, dim: Dim::Seq, expected: 1, got: 2 },
            da_status::ShapeMismatch,
        ),
        (Error::HeadsNotDivisible { q_heads: 3, kv_heads: 2 }, da_status::ShapeMismatch),
        (Error::HeadDimTooLarge { got: 1 << 17, max: 1 << 16 }, da_status::InvalidShape),
        (Error::SizeOverflow { operand: O::V }, da_status::SizeOverflow),
        (Error::BufferTooSmall { operand: O::Lse, needed: 2, got: 1 }, da_status::BufferTooSmall),
        (Error::OverlappingOutput { operand: O::DQ }, da_status::OverlappingBuffers),
        (Error::NonFinite { operand: O::DOut, offset: 0 }, da_status::NonFinite),
        (Error::AllocationFailed { operand: O::Scratch, len: 1 }, da_status::AllocationFailed),
        (Error::NotAPermutation { block: 0 }, da_status::BadPlan),
        (Error::UnsupportedDtype { operand: O::Q }, da_status::Unsupported),
        (Error::UnsupportedHeadDim { got: 3 }, da_status::Unsupported),
        (Error::UnsupportedBlockRows { got: 3 }, da_status::Unsupported),
        (Error::InvalidTarget { got: f64::NAN }, da_status::InvalidArgument),
        (Error::GroupingUnavailable { reason: "r" }, da_status::Unsupported),
        (Error::UnsupportedGroupSize { got: 3 }, da_status::Unsupported),
    ];
    for (e, want) in cases {
        assert_eq!(da_status::of_error(&e), want, "{e:?}");
        // The message is the core's.
        let s = boundary(|| Err(e.into()));
        assert_eq!((s, message()), (want, e.to_string()));
    }
}
