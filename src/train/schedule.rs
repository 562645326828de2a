//! Learning-rate schedules with linear warm-up, as transformers' `get_*_schedule_with_warmup`.
//!
//! For optimizer step `t` (0-based, the step about to be taken) of `total`, peak `lr`, `w`
//! warm-up steps: `lr·t/w` while `t < w`, then with `p = (t − w)/(total − w)`:
//! cosine `lr·½(1 + cos πp)`, linear `lr·(1 − p)`, constant `lr`.

use super::config::ScheduleKind;

/// A learning-rate schedule: a pure function of the step, so a resumed run needs only the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f32,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    /// Learning rate of step `t` (0-based).
    pub fn lr(&self, t: usize) -> f32 {
        if t < self.warmup {
            return self.peak * t as f32 / self.warmup.max(1) as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let p = ((t - self.warmup) as f64 / span).min(1.0);
        let f = match self.kind {
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            ScheduleKind::Linear => 1.0 - p,
            ScheduleKind::Constant => 1.0,
        };
        (self.peak as f64 * f) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule { kind: ScheduleKind::Cosine, peak: 1.0, warmup: 10, total: 110 };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-6);
        assert_eq!(s.lr(10), 1.0);
        assert!((s.lr(60) - 0.5).abs() < 1e-6);
        assert!(s.lr(110).abs() < 1e-6);
        let l = Schedule { kind: ScheduleKind::Linear, ..s };
        assert!((l.lr(35) - 0.75).abs() < 1e-6);
        let c = Schedule { kind: ScheduleKind::Constant, ..s };
        assert_eq!(c.lr(100), 1.0);
    }
}
