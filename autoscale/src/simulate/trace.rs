//! Load traces: an arrival rate over time, and the requests it generates (Poisson arrivals, lognormal service
//! times), the same for every policy.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A named load shape, with the pool bounds it runs under.
#[derive(Clone, Debug)]
pub struct Trace {
    pub name: &'static str,
    pub description: &'static str,
    /// Seconds.
    pub duration: f64,
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// Requests per second during second `i` (the rate is constant within a second).
    rates: Vec<f64>,
}

/// Every trace name, in the order they are reported.
pub const TRACE_NAMES: [&str; 7] = ["step", "ramp", "burst", "diurnal", "noisy", "sparse", "flash"];

impl Trace {
    /// The trace called `name`; noisy shapes are drawn from `seed`.
    pub fn named(name: &str, seed: u64) -> Option<Trace> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7472_6163_6500_0000 ^ name_hash(name));
        let trace = match name {
            "step" => {
                Self::build("step", "60 req/s, a step to 240 req/s at 5 min, back to 60 at 15 min", 1200, 1, 40, |t| {
                    if (300.0..900.0).contains(&t) { 240.0 } else { 60.0 }
                })
            }
            "ramp" => Self::build(
                "ramp",
                "20 → 320 req/s over 20 min, 5 min at 320, down to 20 over 5 min",
                2400,
                1,
                40,
                |t| match t {
                    t if t < 300.0 => 20.0,
                    t if t < 1500.0 => 20.0 + 300.0 * (t - 300.0) / 1200.0,
                    t if t < 1800.0 => 320.0,
                    t if t < 2100.0 => 320.0 - 300.0 * (t - 1800.0) / 300.0,
                    _ => 20.0,
                },
            ),
            "burst" => {
                Self::build("burst", "40 req/s with five 60 s bursts to 320 req/s, 5-7 min apart", 1900, 1, 40, |t| {
                    let bursts = [180.0, 560.0, 900.0, 1310.0, 1650.0];
                    if bursts.iter().any(|b| (*b..*b + 60.0).contains(&t)) { 320.0 } else { 40.0 }
                })
            }
            "diurnal" => {
                Self::build("diurnal", "a day in an hour: 30 → 250 → 30 req/s, sinusoidal", 3600, 1, 40, |t| {
                    30.0 + 220.0 * (1.0 - (2.0 * std::f64::consts::PI * t / 3600.0).cos()) / 2.0
                })
            }
            "noisy" => {
                // Ornstein-Uhlenbeck around 120 req/s: ±20 % that persists for about 30 s.
                let (tau, sigma) = (30.0_f64, 0.2_f64);
                let decay = (-1.0 / tau).exp();
                let kick = sigma * (1.0 - decay * decay).sqrt();
                let mut x = 0.0;
                let rates = (0..1800)
                    .map(|_| {
                        x = x * decay + kick * standard_normal(&mut rng);
                        (120.0 * (1.0 + x)).max(0.0)
                    })
                    .collect();
                Trace {
                    name: "noisy",
                    description: "noisy steady: 120 req/s ± 20 %, correlated over ~30 s",
                    duration: 1800.0,
                    min_replicas: 1,
                    max_replicas: 40,
                    rates,
                }
            }
            "sparse" => Self::build(
                "sparse",
                "idle, with four 60 s bursts of 15 req/s 6-8 min apart; minReplicas 0",
                1800,
                0,
                40,
                |t| {
                    let bursts = [120.0, 600.0, 1050.0, 1500.0];
                    if bursts.iter().any(|b| (*b..*b + 60.0).contains(&t)) { 15.0 } else { 0.0 }
                },
            ),
            "flash" => Self::build(
                "flash",
                "30 req/s with seven 20 s flashes to 300 req/s (10×), 3.5-4.5 min apart",
                1800,
                1,
                40,
                |t| {
                    let flashes = [150.0, 390.0, 600.0, 870.0, 1080.0, 1350.0, 1560.0];
                    if flashes.iter().any(|f| (*f..*f + 20.0).contains(&t)) { 300.0 } else { 30.0 }
                },
            ),
            _ => return None,
        };
        Some(trace)
    }

    fn build(
        name: &'static str,
        description: &'static str,
        seconds: usize,
        min: i32,
        max: i32,
        rate: impl Fn(f64) -> f64,
    ) -> Trace {
        let rates = (0..seconds).map(|i| rate(i as f64 + 0.5)).collect();
        Trace { name, description, duration: seconds as f64, min_replicas: min, max_replicas: max, rates }
    }

    /// The arrival rate at `t` seconds.
    pub fn rate_at(&self, t: f64) -> f64 {
        if t < 0.0 {
            return 0.0;
        }
        self.rates.get(t as usize).copied().unwrap_or(0.0)
    }

    fn peak_rate(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }

    /// Poisson arrivals at the trace's rate, each with its service time, in arrival order.
    pub fn requests(&self, service: &ServiceTime, seed: u64) -> Vec<Request> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7265_7175_6573_7473 ^ name_hash(self.name));
        let peak = self.peak_rate();
        let mut out = Vec::with_capacity((self.rates.iter().sum::<f64>() * 1.05) as usize);
        if peak <= 0.0 {
            return out;
        }
        // Thinning: candidates at the peak rate, each kept with probability rate(t) / peak.
        let mut t = 0.0;
        loop {
            t += -(1.0 - rng.random::<f64>()).ln() / peak;
            if t >= self.duration {
                break;
            }
            if rng.random::<f64>() * peak < self.rate_at(t) {
                out.push(Request { arrival: t, service: service.sample(&mut rng) });
            }
        }
        out
    }
}

/// One request: when it arrives and how long a handler slot takes to serve it (seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    pub arrival: f64,
    pub service: f64,
}

/// Lognormal service times with a given mean and log-space spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServiceTime {
    pub mean_seconds: f64,
    pub sigma: f64,
}

impl ServiceTime {
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        let mu = self.mean_seconds.ln() - self.sigma * self.sigma / 2.0;
        (mu + self.sigma * standard_normal(rng)).exp()
    }
}

fn standard_normal(rng: &mut impl Rng) -> f64 {
    // Box-Muller; 1 - u keeps the logarithm finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_trace_exists() {
        for name in TRACE_NAMES {
            let t = Trace::named(name, 1).unwrap();
            assert_eq!(t.name, name);
            assert!(t.min_replicas <= t.max_replicas);
        }
        assert!(Trace::named("nope", 1).is_none());
    }

    #[test]
    fn arrivals_follow_the_rate_and_are_reproducible() {
        let trace = Trace::named("step", 1).unwrap();
        let service = ServiceTime { mean_seconds: 0.2, sigma: 0.5 };
        let a = trace.requests(&service, 7);
        assert_eq!(a, trace.requests(&service, 7));
        let in_step = a.iter().filter(|r| (300.0..900.0).contains(&r.arrival)).count() as f64;
        assert!((in_step / 600.0 - 240.0).abs() < 5.0, "{}", in_step / 600.0);
        let mean_service = a.iter().map(|r| r.service).sum::<f64>() / a.len() as f64;
        assert!((mean_service - 0.2).abs() < 0.005, "{mean_service}");
        assert!(a.windows(2).all(|w| w[0].arrival <= w[1].arrival));
    }
}
