//! The LSH projection matrix R (block_rows x P, standard normal), generated
//! from the seed by a documented, platform-independent generator so every
//! backend groups identically. The GPU backend uploads these exact numbers.
//!
//! Generator (entry `R[r][p]`, counter `k = r * 32 + p`):
//! ```text
//! mix(x)  = splitmix64 finaliser of x
//! a       = mix(seed + (2k + 1) * 0x9E3779B97F4A7C15)      (wrapping u64 arithmetic)
//! b       = mix(seed + (2k + 2) * 0x9E3779B97F4A7C15)
//! u1      = ((a >> 11) + 1) * 2^-53                         in (0, 1]
//! u2      = (b >> 11) * 2^-53                               in [0, 1)
//! R[r][p] = f32( sqrt(-2 ln u1) * cos(2 pi u2) )            (Box-Muller in f64, libm)
//! ```
//! The counter uses a fixed row pitch of 32 (the maximum P), so R for a
//! smaller `block_rows` or P is the top-left corner of R for larger ones.

use crate::config::Config;
use crate::error::{Error, Operand, Result};

/// The largest number of projections (bits of an LSH code).
pub const MAX_PROJECTIONS: usize = 32;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Entry `R[row][p]` of the projection matrix for `seed`.
pub fn projection(seed: u64, row: usize, p: usize) -> f32 {
    let k = (row as u64).wrapping_mul(MAX_PROJECTIONS as u64).wrapping_add(p as u64);
    let a = mix(seed.wrapping_add(k.wrapping_mul(2).wrapping_add(1).wrapping_mul(GOLDEN)));
    let b = mix(seed.wrapping_add(k.wrapping_mul(2).wrapping_add(2).wrapping_mul(GOLDEN)));
    const TWO_M53: f64 = 1.0 / (1u64 << 53) as f64;
    let u1 = ((a >> 11) + 1) as f64 * TWO_M53;
    let u2 = (b >> 11) as f64 * TWO_M53;
    (libm::sqrt(-2.0 * libm::log(u1)) * libm::cos(2.0 * core::f64::consts::PI * u2)) as f32
}

/// Number of entries of R for a config: `block_rows * num_projections`.
pub fn projections_len(cfg: &Config<'_>) -> Result<usize> {
    cfg.validate_plan_params()?;
    cfg.block_rows
        .checked_mul(cfg.num_projections as usize)
        .ok_or(Error::SizeOverflow { operand: Operand::Projections })
}

/// Writes R, row-major `[block_rows][num_projections]`, into `out`.
pub fn projections_into(cfg: &Config<'_>, out: &mut [f32]) -> Result<()> {
    let needed = projections_len(cfg)?;
    if out.len() < needed {
        return Err(Error::BufferTooSmall { operand: Operand::Projections, needed, got: out.len() });
    }
    let p_count = cfg.num_projections as usize;
    for (i, r) in out[..needed].iter_mut().enumerate() {
        *r = projection(cfg.seed, i / p_count, i % p_count);
    }
    Ok(())
}

/// R, row-major `[block_rows][num_projections]`.
#[cfg(feature = "alloc")]
pub fn projections(cfg: &Config<'_>) -> Result<alloc::vec::Vec<f32>> {
    let mut out = crate::try_vec(projections_len(cfg)?, 0.0f32, Operand::Projections)?;
    projections_into(cfg, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by an independent Python implementation of the
    /// generator documented above (`math.log`, `math.cos`, rounded to f32),
    /// written with all the digits Python printed.
    #[test]
    #[allow(clippy::excessive_precision)]
    fn generator_matches_independent_implementation() {
        let expected: [(u64, usize, usize, f32); 7] = [
            (0x0, 0, 0, -0.452_757_745_981_216_43),
            (0x0, 0, 1, 2.650_605_916_976_928_7),
            (0x0, 1, 0, -0.297_742_158_174_514_77),
            (0x0, 63, 15, 0.256_152_421_236_038_2),
            (0x2a, 5, 31, 1.657_180_070_877_075_2),
            (0xdead_beef, 127, 7, 0.246_559_679_508_209_23),
            (u64::MAX, 3, 3, -2.333_073_377_609_253),
        ];
        for (seed, row, p, x) in expected {
            assert_eq!(projection(seed, row, p), x, "seed {seed:#x} row {row} p {p}");
        }
    }

    #[test]
    fn entries_are_standard_normal() {
        let n = 64 * 1024;
        let (mut sum, mut sq) = (0f64, 0f64);
        for i in 0..n {
            let x = projection(7, i / 32, i % 32) as f64;
            sum += x;
            sq += x * x;
        }
        let mean = sum / n as f64;
        let var = sq / n as f64 - mean * mean;
        assert!(libm::fabs(mean) < 0.02, "mean {mean}");
        assert!(libm::fabs(var - 1.0) < 0.03, "variance {var}");
    }

    #[test]
    fn smaller_matrices_are_corners_of_larger_ones() {
        let big = Config { block_rows: 128, num_projections: 32, ..Config::default() };
        let small = Config { block_rows: 64, num_projections: 16, ..Config::default() };
        let mut rb = [0f32; 128 * 32];
        let mut rs = [0f32; 64 * 16];
        projections_into(&big, &mut rb).unwrap();
        projections_into(&small, &mut rs).unwrap();
        for r in 0..64 {
            assert_eq!(rs[r * 16..(r + 1) * 16], rb[r * 32..r * 32 + 16]);
        }
    }
}
