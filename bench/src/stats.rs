//! Statistics: percentiles from an HDR histogram, and the Mann-Whitney U test that `compare`
//! uses to tell a regression from noise.

use serde::{Deserialize, Serialize};

/// Samples are recorded in the histogram with this many steps per unit (1 µs for a value in
/// ms, 0.001 KiB for one in KiB), three significant digits.
const SCALE: f64 = 1_000_000.0;

/// What a list of samples looks like: count, extremes, mean and HDR percentiles.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    /// `None` for no samples. Negative samples (a difference of two timings can be) count as
    /// 0 in the histogram; min, max and mean are exact.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let finite: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            return None;
        }
        let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant digits is a valid precision");
        for v in &finite {
            // The histogram grows to fit; only a value beyond u64 could fail, and those are
            // clamped by the cast.
            let _ = h.record((v.max(0.0) * SCALE).round() as u64);
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / SCALE;
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // The histogram's buckets are 0.1% wide; keep percentiles inside the observed range.
        let clamp = |v: f64| v.clamp(min.max(0.0).min(max), max);
        Some(Summary {
            n: finite.len(),
            min,
            max,
            mean: finite.iter().sum::<f64>() / finite.len() as f64,
            p50: clamp(q(0.5)),
            p90: clamp(q(0.9)),
            p99: clamp(q(0.99)),
        })
    }
}

/// Exact median (mean of the two middle values for an even count); NaN for no samples.
pub fn median(samples: &[f64]) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Linear-interpolated quantile `q` in [0, 1] of the samples (for box plots); NaN for none.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The outcome of a two-sided Mann-Whitney U test of `a` against `b`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct MannWhitney {
    /// U statistic of the first sample (pairs where a > b, ties counting one half).
    pub u: f64,
    /// Standard score of U under the null hypothesis (normal approximation, tie and
    /// continuity corrected).
    pub z: f64,
    /// Two-sided p-value; 1 when the test cannot say anything (an empty sample, all values equal).
    pub p: f64,
}

/// Two-sided Mann-Whitney U test with the normal approximation, the tie correction of the
/// variance and a continuity correction of 0.5 (what `scipy.stats.mannwhitneyu(a, b,
/// method="asymptotic")` computes).
pub fn mann_whitney(a: &[f64], b: &[f64]) -> MannWhitney {
    let (n1, n2) = (a.len(), b.len());
    if n1 == 0 || n2 == 0 {
        return MannWhitney { u: 0.0, z: 0.0, p: 1.0 };
    }
    let mut all: Vec<(f64, bool)> = a.iter().map(|&v| (v, true)).chain(b.iter().map(|&v| (v, false))).collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let mut rank_sum_a = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let rank = (i + j + 2) as f64 / 2.0;
        let t = (j - i + 1) as f64;
        tie_term += t * t * t - t;
        rank_sum_a += rank * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (n1f, n2f, nf) = (n1 as f64, n2 as f64, n as f64);
    let u = rank_sum_a - n1f * (n1f + 1.0) / 2.0;
    let mu = n1f * n2f / 2.0;
    let var = n1f * n2f / 12.0 * ((nf + 1.0) - tie_term / (nf * (nf - 1.0)).max(1.0));
    if var <= 0.0 {
        return MannWhitney { u, z: 0.0, p: 1.0 };
    }
    let diff = u - mu;
    let corrected = (diff.abs() - 0.5).max(0.0) * diff.signum();
    let z = corrected / var.sqrt();
    let p = (2.0 * normal_sf(z.abs())).min(1.0);
    MannWhitney { u, z, p }
}

/// P(Z > z) for a standard normal Z.
pub fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (W. J. Cody's rational Chebyshev approximations as
/// given in Numerical Recipes' `erfcc`; relative error below 1.2e-7 everywhere).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles_of_one_to_hundred() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!(s.n, 100);
        assert_eq!((s.min, s.max), (1.0, 100.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
        assert!((s.p50 - 50.0).abs() <= 0.05, "{}", s.p50);
        assert!((s.p90 - 90.0).abs() <= 0.1, "{}", s.p90);
        assert!((s.p99 - 99.0).abs() <= 0.1, "{}", s.p99);
    }

    #[test]
    fn summary_of_nothing_is_none() {
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn fractional_values_keep_their_precision() {
        let s = Summary::of(&[0.0123, 0.0124, 0.0125]).unwrap();
        assert!((s.p50 - 0.0124).abs() < 0.0001, "{}", s.p50);
    }

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.5), 1.5);
    }

    #[test]
    fn erfc_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        assert!((erfc(1.0) - 0.157_299_207).abs() < 1e-7);
        assert!((erfc(-1.0) - 1.842_700_793).abs() < 1e-7);
        assert!((normal_sf(1.959_964) - 0.025).abs() < 1e-6);
    }

    // Reference values from scipy.stats.mannwhitneyu(a, b, method="asymptotic",
    // use_continuity=True, alternative="two-sided").
    #[test]
    fn mann_whitney_separated_samples() {
        let r = mann_whitney(&[1.0, 2.0, 3.0, 4.0, 5.0], &[6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!(r.u, 0.0);
        assert!((r.p - 0.012_185_8).abs() < 1e-5, "{r:?}");
        let r = mann_whitney(&[6.0, 7.0, 8.0, 9.0, 10.0], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(r.u, 25.0);
        assert!((r.p - 0.012_185_8).abs() < 1e-5, "{r:?}");
    }

    #[test]
    fn mann_whitney_with_ties() {
        // Ranks of a: 1, 3, 3, 5.5 → U = 12.5 - 10 = 2.5; ties (2: three, 3: two, 4: two)
        // give sum(t³-t) = 36, sigma² = 20/12 * (10 - 36/72) = 15.83; z = (10 - 2.5 - 0.5)/3.979
        // = 1.759; p = 0.07855.
        let r = mann_whitney(&[1.0, 2.0, 2.0, 3.0], &[2.0, 3.0, 4.0, 4.0, 5.0]);
        assert_eq!(r.u, 2.5);
        assert!((r.p - 0.078_55).abs() < 1e-4, "{r:?}");
    }

    #[test]
    fn mann_whitney_degenerate_cases() {
        assert_eq!(mann_whitney(&[], &[1.0]).p, 1.0);
        assert_eq!(mann_whitney(&[1.0, 1.0], &[1.0, 1.0]).p, 1.0);
        let same: Vec<f64> = (0..20).map(f64::from).collect();
        assert!(mann_whitney(&same, &same).p > 0.9);
    }
}
