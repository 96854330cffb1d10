//! Error estimates and the error-budget planner through the C ABI: equal to
//! the core's, and every status path of their arguments.

use distr_attention_core::budget::{choose_group_sizes, Target};
use distr_attention_core::{estimate_errors, plan_with_keys, HeadErrorEstimate, PlanRef, PlanShape};

use super::*;

/// `da_estimate_errors` into three fresh arrays of `len` doubles.
fn estimate(
    ctx: &Ctx,
    cfg: &da_config,
    plan: Option<&[u16]>,
    t: &[da_tensor; 4],
    sample_rows: usize,
    len: usize,
) -> (da_status, [Vec<f64>; 3]) {
    let mut out = [vec![-1f64; len], vec![-1f64; len], vec![-1f64; len]];
    let (pp, pl) = plan.map_or((null(), 0), |p| (p.as_ptr(), p.len()));
    let [a, b, c] = &mut out;
    // SAFETY: every pointer addresses the extent its descriptor or length says.
    let s = unsafe {
        da_estimate_errors(
            ctx.0,
            cfg,
            pp,
            pl,
            &t[0],
            &t[1],
            &t[2],
            sample_rows,
            a.as_mut_ptr(),
            b.as_mut_ptr(),
            c.as_mut_ptr(),
            len,
        )
    };
    (s, out)
}

fn core_estimate(p: &Problem, cfg: &Config<'_>, plan: &[u16], rows: usize) -> Vec<HeadErrorEstimate> {
    let plan = PlanRef::new(PlanShape::new(cfg, &p.lq).unwrap(), plan).unwrap();
    let (q, k, v) = (Tensor::new(&p.q, p.lq), Tensor::new(&p.k, p.lk), Tensor::new(&p.v, p.lv));
    estimate_errors(cfg, &plan, &q, &k, &v, rows).unwrap()
}

#[test]
fn estimates_match_the_core() {
    let ctx = Ctx::new();
    let p = Problem::new(2, 40, 33, 4, 2, 16, 8);
    let sizes = [1u32, 2, 4, 8];
    let su = [1usize, 2, 4, 8];
    for grouping in [da_grouping::Lsh, da_grouping::Similarity, da_grouping::KeyWeighted] {
        let cfg = da_config {
            block_rows: 16,
            causal: 1,
            grouping: grouping as u32,
            group_sizes: sizes.as_ptr(),
            num_group_sizes: 4,
            ..config()
        };
        let c = Config { group_sizes: GroupSizes::PerHead(&su), ..core_config(&cfg) };
        let mut out = vec![0f32; p.out_len()];
        let t = p.descs(&mut out);
        // The plan da_forward uses, passed in; and computed by the call itself.
        let want_plan = plan_with_keys(&c, &Tensor::new(&p.q, p.lq), &Tensor::new(&p.k, p.lk)).unwrap();
        for rows in [16usize, 0, 1000] {
            let want = core_estimate(&p, &c, want_plan.as_slice(), rows);
            for plan in [Some(want_plan.as_slice()), None] {
                let (s, [rel, rms, sampled]) = estimate(&ctx, &cfg, plan, &t, rows, 9);
                expect(s, da_status::Ok, "");
                for e in &want {
                    let i = e.batch * 4 + e.head;
                    assert_eq!(rel[i].to_bits(), e.relative_score_error.to_bits(), "{grouping:?} {e:?}");
                    assert_eq!(rms[i].to_bits(), e.rms_logit_error.to_bits());
                    assert_eq!(sampled[i].to_bits(), e.sampled_output_error.to_bits());
                    if e.head == 0 {
                        // G = 1: no error.
                        assert_eq!((rel[i], rms[i]), (0.0, 0.0));
                    } else {
                        assert!(rel[i] > 0.0 && rms[i] > 0.0);
                    }
                    assert_eq!(sampled[i].is_nan(), rows == 0);
                }
                assert_eq!(&rel[8..], &[-1.0], "only batch * heads entries are written");
            }
        }
    }
}

#[test]
fn estimate_outputs_are_optional() {
    let ctx = Ctx::new();
    let p = Problem::small();
    let cfg = config();
    let mut out = vec![0f32; p.out_len()];
    let t = p.descs(&mut out);
    let mut sampled = vec![0f64; 2];
    // SAFETY: only the third output is given; the others are NULL.
    let s = unsafe {
        da_estimate_errors(
            ctx.0,
            &cfg,
            null(),
            0,
            &t[0],
            &t[1],
            &t[2],
            4,
            null_mut(),
            null_mut(),
            sampled.as_mut_ptr(),
            2,
        )
    };
    expect(s, da_status::Ok, "");
    let plan = distr_attention_core::plan(&core_config(&cfg), &Tensor::new(&p.q, p.lq)).unwrap();
    let want = core_estimate(&p, &core_config(&cfg), plan.as_slice(), 4);
    assert_eq!(sampled, [want[0].sampled_output_error, want[1].sampled_output_error]);
}

#[test]
fn estimate_statuses() {
    let ctx = Ctx::new();
    let mut p = Problem::small();
    let cfg = config();
    let mut out = vec![0f32; p.out_len()];
    let t = p.descs(&mut out);
    let n = plan_shape(&cfg, &t[0]).unwrap().num_entries;
    let mut plan_buf = vec![0u16; n];
    expect(plan_into_buf(&ctx, &cfg, &t[0], &mut plan_buf), da_status::Ok, "");

    expect(
        estimate(&ctx, &cfg, Some(&plan_buf), &t, 4, 1).0,
        da_status::BufferTooSmall,
        "relative_score_error: buffer holds 1 elements, 2 needed",
    );
    expect(
        estimate(&ctx, &cfg, Some(&plan_buf[..n - 1]), &t, 4, 2).0,
        da_status::BufferTooSmall,
        "plan: buffer holds",
    );
    let mut bad_plan = plan_buf.clone();
    bad_plan[3] = 99;
    expect(estimate(&ctx, &cfg, Some(&bad_plan), &t, 4, 2).0, da_status::BadPlan, "not a permutation");
    expect(
        estimate(&ctx, &da_config { group_size: 5, ..cfg }, Some(&plan_buf), &t, 4, 2).0,
        da_status::BadConfig,
        "group size 5",
    );
    let mut x = t;
    x[1].head_dim = 8;
    expect(
        estimate(&ctx, &cfg, Some(&plan_buf), &x, 4, 2).0,
        da_status::ShapeMismatch,
        "k: dimension head_dim",
    );
    let v16: Vec<f16> = p.v.iter().map(|&x| f16::from_f32(x)).collect();
    let mut x = t;
    x[2] = desc(&v16, p.lv);
    expect(estimate(&ctx, &cfg, Some(&plan_buf), &x, 4, 2).0, da_status::Unsupported, "v: dtype is f16");
    // SAFETY (the raw calls): pointers valid, NULL, or rejected before use.
    unsafe {
        let mut r = vec![0f64; 3];
        let s = da_estimate_errors(
            ctx.0,
            &cfg,
            null(),
            5,
            &t[0],
            &t[1],
            &t[2],
            4,
            r.as_mut_ptr(),
            null_mut(),
            null_mut(),
            2,
        );
        expect(s, da_status::NullPointer, "plan: pointer is NULL but plan_len is 5");
        let s = da_estimate_errors(
            ctx.0,
            &cfg,
            null(),
            0,
            null(),
            &t[1],
            &t[2],
            4,
            r.as_mut_ptr(),
            null_mut(),
            null_mut(),
            2,
        );
        expect(s, da_status::NullPointer, "q: tensor descriptor is NULL");
        let s = da_estimate_errors(
            null_mut(),
            &cfg,
            null(),
            0,
            &t[0],
            &t[1],
            &t[2],
            4,
            r.as_mut_ptr(),
            null_mut(),
            null_mut(),
            2,
        );
        expect(s, da_status::NullPointer, "context is NULL");
        let odd = r.as_mut_ptr().cast::<u8>().wrapping_add(4).cast::<f64>();
        let s = da_estimate_errors(
            ctx.0,
            &cfg,
            null(),
            0,
            &t[0],
            &t[1],
            &t[2],
            4,
            null_mut(),
            odd,
            null_mut(),
            2,
        );
        expect(s, da_status::MisalignedPointer, "rms_logit_error: pointer");
        // Two outputs sharing memory, and an output over Q.
        let s = da_estimate_errors(
            ctx.0,
            &cfg,
            null(),
            0,
            &t[0],
            &t[1],
            &t[2],
            4,
            r.as_mut_ptr(),
            r.as_mut_ptr().add(1),
            null_mut(),
            2,
        );
        expect(
            s,
            da_status::OverlappingBuffers,
            "relative_score_error: the buffer written overlaps the buffer of rms_logit_error",
        );
        let over_q = p.q.as_ptr() as *mut f64;
        let s = da_estimate_errors(
            ctx.0,
            &cfg,
            null(),
            0,
            &t[0],
            &t[1],
            &t[2],
            4,
            null_mut(),
            null_mut(),
            over_q,
            2,
        );
        expect(
            s,
            da_status::OverlappingBuffers,
            "sampled_output_error: the buffer written overlaps the buffer of q",
        );
        let over_plan = plan_buf.as_ptr() as *mut f64;
        let s = da_estimate_errors(
            ctx.0,
            &cfg,
            plan_buf.as_ptr(),
            n,
            &t[0],
            &t[1],
            &t[2],
            4,
            over_plan,
            null_mut(),
            null_mut(),
            2,
        );
        expect(s, da_status::OverlappingBuffers, "overlaps the buffer of plan");
        assert_eq!(r, [0.0; 3], "nothing written on error");
    }
    // Key-weighted without a plan plans with the keys; a NaN key is reported.
    p.k[2] = f32::NAN;
    let t = p.descs(&mut out);
    let kw = da_config { grouping: da_grouping::KeyWeighted as u32, ..cfg };
    expect(estimate(&ctx, &kw, None, &t, 4, 2).0, da_status::NonFinite, "k: non-finite value");
}

/// Calls `da_choose_group_sizes` and returns the status and every output.
struct Choice {
    sizes: Vec<u32>,
    measured: Vec<f64>,
    estimated: Vec<f64>,
    flop_saving: f64,
    target_met: u32,
}

fn choose(
    cfg: &da_config,
    samples: &[[da_tensor; 3]],
    candidates: &[u32],
    kind: u32,
    target: f64,
    heads: usize,
) -> (da_status, Choice) {
    let q: Vec<da_tensor> = samples.iter().map(|s| s[0]).collect();
    let k: Vec<da_tensor> = samples.iter().map(|s| s[1]).collect();
    let v: Vec<da_tensor> = samples.iter().map(|s| s[2]).collect();
    let mut c = Choice {
        sizes: vec![0; heads],
        measured: vec![-1.0; heads],
        estimated: vec![-1.0; heads],
        flop_saving: -1.0,
        target_met: 7,
    };
    // SAFETY: arrays of `samples.len()` descriptors; outputs of `heads` entries.
    let s = unsafe {
        da_choose_group_sizes(
            cfg,
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            samples.len(),
            if candidates.is_empty() { null() } else { candidates.as_ptr() },
            candidates.len(),
            kind,
            target,
            c.sizes.as_mut_ptr(),
            c.measured.as_mut_ptr(),
            c.estimated.as_mut_ptr(),
            heads,
            &mut c.flop_saving,
            &mut c.target_met,
        )
    };
    (s, c)
}

#[test]
fn planner_matches_the_core() {
    // Two calibration samples of one layer with different lengths.
    let (a, b) = (Problem::new(1, 70, 70, 4, 2, 16, 16), Problem::new(2, 33, 40, 4, 2, 16, 16));
    let samples = [a.descs(&mut [])[..3].try_into().unwrap(), b.descs(&mut [])[..3].try_into().unwrap()];
    fn views(p: &Problem) -> (Tensor<'_, f32>, Tensor<'_, f32>, Tensor<'_, f32>) {
        (Tensor::new(&p.q, p.lq), Tensor::new(&p.k, p.lk), Tensor::new(&p.v, p.lv))
    }
    let core_samples = [views(&a), views(&b)];
    for grouping in [da_grouping::Lsh, da_grouping::Similarity, da_grouping::KeyWeighted] {
        // The config's group sizes are ignored by the planner (a wild pointer is never read).
        let cfg = da_config {
            block_rows: 16,
            causal: 1,
            grouping: grouping as u32,
            group_sizes: 8usize as *const u32,
            num_group_sizes: 3,
            ..config()
        };
        let c = core_config(&da_config { group_sizes: null(), num_group_sizes: 0, ..cfg });
        let candidates = [2u32, 4, 8];
        for (kind, target, core_target) in [
            (da_budget_target::MaxError, 0.3, Target::MaxError(0.3)),
            (da_budget_target::MaxError, 10.0, Target::MaxError(10.0)),
            (da_budget_target::FlopSaving, 0.3, Target::FlopSaving(0.3)),
            (da_budget_target::FlopSaving, 0.9, Target::FlopSaving(0.9)),
        ] {
            let (s, got) = choose(&cfg, &samples, &candidates, kind as u32, target, 5);
            expect(s, da_status::Ok, "");
            let want = choose_group_sizes(&c, &[2, 4, 8], &core_samples, core_target).unwrap();
            let sizes: Vec<u32> = want.group_sizes().iter().map(|&g| g as u32).collect();
            assert_eq!(&got.sizes[..4], &sizes[..], "{grouping:?} {core_target:?}");
            assert_eq!(got.sizes[4], 0, "only q_heads entries are written");
            for (h, w) in want.heads.iter().enumerate() {
                assert_eq!(got.measured[h].to_bits(), w.measured_error.to_bits());
                assert_eq!(got.estimated[h].to_bits(), w.estimated_error.to_bits());
            }
            assert_eq!(got.flop_saving.to_bits(), want.flop_saving.to_bits());
            assert_eq!(got.target_met, want.target_met as u32);
            if let Target::MaxError(e) = core_target {
                assert!(got.measured[..4].iter().all(|&m| m <= e));
            }
        }
        // An unreachable FLOP target (0.9 with G <= 2) is reported, not an error.
        let (s, got) = choose(&cfg, &samples, &[2], da_budget_target::FlopSaving as u32, 0.9, 4);
        expect(s, da_status::Ok, "");
        assert_eq!((got.sizes, got.target_met), (vec![2; 4], 0));
    }
    // No candidates: every head exact, nothing saved; optional outputs may be NULL.
    let mut sizes = [9u32; 4];
    let (q, k, v) = (samples[0][0], samples[0][1], samples[0][2]);
    // SAFETY: one sample; four sizes; the rest NULL.
    let s = unsafe {
        da_choose_group_sizes(
            &config(),
            &q,
            &k,
            &v,
            1,
            null(),
            0,
            0,
            0.1,
            sizes.as_mut_ptr(),
            null_mut(),
            null_mut(),
            4,
            null_mut(),
            null_mut(),
        )
    };
    expect(s, da_status::Ok, "");
    assert_eq!(sizes, [1; 4]);
}

#[test]
fn planner_with_half_samples() {
    let p = Problem::new(1, 40, 40, 2, 2, 16, 16);
    let h = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<bf16>>();
    let (q, k, v) = (h(&p.q), h(&p.k), h(&p.v));
    let sample = [desc(&q, p.lq), desc(&k, p.lk), desc(&v, p.lv)];
    let cfg = da_config { grouping: da_grouping::Similarity as u32, ..config() };
    let (s, got) = choose(&cfg, &[sample], &[2, 4], 0, 0.5, 2);
    expect(s, da_status::Ok, "");
    let want = choose_group_sizes(
        &core_config(&cfg),
        &[2, 4],
        &[(Tensor::new(&q, p.lq), Tensor::new(&k, p.lk), Tensor::new(&v, p.lv))],
        Target::MaxError(0.5),
    )
    .unwrap();
    assert_eq!(got.sizes, want.group_sizes().iter().map(|&g| g as u32).collect::<Vec<_>>());
    // A sample of another dtype is refused.
    let mixed = [sample, [desc(&p.q, p.lq), desc(&p.k, p.lk), desc(&p.v, p.lv)]];
    expect(
        choose(&cfg, &mixed, &[2], 0, 0.5, 2).0,
        da_status::Unsupported,
        "calibration sample 1: q: dtype is f32, must equal the dtype of sample 0's q, bf16",
    );
}

#[test]
fn planner_statuses() {
    let mut p = Problem::new(1, 20, 20, 2, 2, 12, 8);
    let s0: [da_tensor; 3] = p.descs(&mut [])[..3].try_into().unwrap();
    let cfg = config();
    let max = da_budget_target::MaxError as u32;
    let flops = da_budget_target::FlopSaving as u32;
    expect(
        choose(&cfg, &[s0], &[2], 2, 0.1, 2).0,
        da_status::InvalidArgument,
        "target_kind 2 is not a da_budget_target value",
    );
    for (kind, target) in [(max, -0.1), (max, f64::NAN), (max, f64::INFINITY), (flops, 1.0), (flops, -0.5)] {
        expect(choose(&cfg, &[s0], &[2], kind, target, 2).0, da_status::InvalidArgument, "out of range");
    }
    expect(choose(&cfg, &[], &[2], max, 0.1, 2).0, da_status::InvalidArgument, "num_samples is 0");
    expect(
        choose(&cfg, &[s0], &[5], max, 0.1, 2).0,
        da_status::BadConfig,
        "group size 5 of query head 0 must be at least 1 and divide head_dim 12",
    );
    let sim = da_config { grouping: da_grouping::Similarity as u32, ..cfg };
    expect(choose(&sim, &[s0], &[6], max, 0.1, 2).0, da_status::Unsupported, "group size 6 is not supported");
    expect(
        choose(&cfg, &[s0], &[2], max, 0.1, 1).0,
        da_status::BufferTooSmall,
        "group_sizes: buffer holds 1 elements, 2 needed",
    );
    expect(
        choose(&da_config { block_rows: 0, ..cfg }, &[s0], &[2], max, 0.1, 2).0,
        da_status::BadConfig,
        "block_rows",
    );
    // Samples that disagree on heads, or are inconsistent in themselves.
    let other = Problem::new(1, 20, 20, 4, 2, 12, 8);
    let s1: [da_tensor; 3] = other.descs(&mut [])[..3].try_into().unwrap();
    expect(
        choose(&cfg, &[s0, s1], &[2], max, 0.1, 4).0,
        da_status::ShapeMismatch,
        "q: dimension heads is 4, expected 2",
    );
    let mut bad = s0;
    bad[2].seq = 19;
    expect(
        choose(&cfg, &[s0, bad], &[2], max, 0.1, 2).0,
        da_status::ShapeMismatch,
        "v: dimension seq is 19, expected 20",
    );
    let mut bad = s0;
    bad[1].data = null();
    expect(
        choose(&cfg, &[s0, bad], &[2], max, 0.1, 2).0,
        da_status::NullPointer,
        "calibration sample 1: k: data pointer is NULL",
    );
    let mut bad = s0;
    bad[0].data = bad[0].data.cast::<u8>().wrapping_add(1).cast();
    expect(
        choose(&cfg, &[bad], &[2], max, 0.1, 2).0,
        da_status::MisalignedPointer,
        "calibration sample 0: q: data pointer",
    );
    let mut bad = s0;
    bad[0].dtype = 5;
    expect(
        choose(&cfg, &[bad], &[2], max, 0.1, 2).0,
        da_status::InvalidArgument,
        "calibration sample 0: q: dtype 5",
    );
    p.v[3] = f32::NAN;
    let nan: [da_tensor; 3] = p.descs(&mut [])[..3].try_into().unwrap();
    expect(choose(&cfg, &[nan], &[2], max, 0.1, 2).0, da_status::NonFinite, "v: non-finite value");
    p.v[3] = 0.0;

    // Pointers.
    let mut sizes = [0u32; 2];
    let mut errs = [0f64; 4];
    let mut saving = 0f64;
    let (q, k, v) = (s0[0], s0[1], s0[2]);
    let cand = [2u32];
    // SAFETY (every call): pointers valid, NULL, or rejected before use.
    unsafe {
        let call = |q: *const da_tensor,
                    cand: *const u32,
                    nc: usize,
                    sizes: *mut u32,
                    m: *mut f64,
                    e: *mut f64,
                    fs: *mut f64,
                    tm: *mut u32| {
            da_choose_group_sizes(&cfg, q, &k, &v, 1, cand, nc, 0, 0.1, sizes, m, e, 2, fs, tm)
        };
        let sp = sizes.as_mut_ptr();
        expect(
            call(null(), cand.as_ptr(), 1, sp, null_mut(), null_mut(), null_mut(), null_mut()),
            da_status::NullPointer,
            "q: descriptor array is NULL",
        );
        expect(
            call(&q, null(), 1, sp, null_mut(), null_mut(), null_mut(), null_mut()),
            da_status::NullPointer,
            "candidates: pointer is NULL but num_candidates is 1",
        );
        expect(
            call(&q, cand.as_ptr(), 1, null_mut(), null_mut(), null_mut(), null_mut(), null_mut()),
            da_status::NullPointer,
            "group_sizes: pointer is NULL",
        );
        let odd = cand.as_ptr().cast::<u8>().wrapping_add(1).cast::<u32>();
        expect(
            call(&q, odd, 1, sp, null_mut(), null_mut(), null_mut(), null_mut()),
            da_status::MisalignedPointer,
            "candidates: pointer",
        );
        let odd = (&mut saving as *mut f64).cast::<u8>().wrapping_add(4).cast::<f64>();
        expect(
            call(&q, cand.as_ptr(), 1, sp, null_mut(), null_mut(), odd, null_mut()),
            da_status::MisalignedPointer,
            "flop_saving: pointer",
        );
        let ep = errs.as_mut_ptr();
        expect(
            call(&q, cand.as_ptr(), 1, sp, ep, ep.add(1), null_mut(), null_mut()),
            da_status::OverlappingBuffers,
            "measured_error: the buffer written overlaps the buffer of estimated_error",
        );
        expect(
            call(&q, cand.as_ptr(), 1, sp, ep, null_mut(), ep.add(1), null_mut()),
            da_status::OverlappingBuffers,
            "overlaps the buffer of flop_saving",
        );
        expect(
            call(&q, cand.as_ptr(), 1, sp, null_mut(), null_mut(), null_mut(), sp.add(1)),
            da_status::OverlappingBuffers,
            "group_sizes: the buffer written overlaps the buffer of target_met",
        );
        let over_v = p.v.as_ptr() as *mut f64;
        expect(
            call(&q, cand.as_ptr(), 1, sp, over_v, null_mut(), null_mut(), null_mut()),
            da_status::OverlappingBuffers,
            "measured_error: the buffer written overlaps the buffer of v",
        );
        let over_cand = cand.as_ptr() as *mut u32;
        expect(
            call(&q, cand.as_ptr(), 1, over_cand, null_mut(), null_mut(), null_mut(), null_mut()),
            da_status::OverlappingBuffers,
            "group_sizes: the buffer written overlaps the buffer of candidates",
        );
        expect(
            da_choose_group_sizes(
                null(),
                &q,
                &k,
                &v,
                1,
                null(),
                0,
                0,
                0.1,
                sp,
                null_mut(),
                null_mut(),
                2,
                null_mut(),
                null_mut(),
            ),
            da_status::NullPointer,
            "config is NULL",
        );
    }
    assert_eq!((sizes, errs, saving), ([0; 2], [0.0; 4], 0.0), "nothing written on error");
}
