//! The loss plot: a hand-written SVG (no plotting dependency) with two panels, training loss
//! (and eval loss as dots) on top and the learning rate below.

use super::checkpoint::MetricRow;
use std::fmt::Write;

const W: f64 = 720.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;

/// A named series: (legend, colour, points, drawn as dots instead of a line).
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>, bool);

fn panel(svg: &mut String, top: f64, title: &str, series: &[Series], max_x: f64) {
    let ys: Vec<f64> = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).filter(|y| y.is_finite()).collect();
    let (mut lo, mut hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
    if ys.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let (pw, ph) = (W - LEFT - RIGHT, PANEL_H - 50.0);
    let (x0, y0) = (LEFT, top + 28.0);
    let px = |x: f64| x0 + pw * x / max_x.max(1.0);
    let py = |y: f64| y0 + ph * (1.0 - (y - lo) / (hi - lo));
    let _ = write!(svg, r##"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"##, top + 18.0);
    let _ = write!(svg, r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##);
    for i in 0..=4 {
        let y = lo + (hi - lo) * i as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="10" text-anchor="end">{}</text><line x1="{x0}" x2="{}" y1="{2}" y2="{2}" stroke="#eee"/>"##,
            x0 - 4.0,
            py(y) + 3.0,
            if hi < 0.01 { format!("{y:.1e}") } else { format!("{y:.3}") },
            x0 + pw,
        );
        let _ = write!(svg, r##"<line x1="{x0}" x2="{}" y1="{}" y2="{1}" stroke="#eee"/>"##, x0 + pw, py(y));
    }
    for i in 0..=4 {
        let x = max_x * i as f64 / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="10" text-anchor="middle">{:.0}</text>"##,
            px(x),
            y0 + ph + 14.0,
            x
        );
    }
    let mut legend_x = x0 + pw - 10.0;
    for (name, color, pts, dots) in series.iter().rev() {
        if *dots {
            for (x, y) in pts.iter().filter(|p| p.1.is_finite()) {
                let _ = write!(svg, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"##, px(*x), py(*y));
            }
        } else {
            let d: Vec<String> =
                pts.iter().filter(|p| p.1.is_finite()).map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            let _ = write!(
                svg,
                r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"##,
                d.join(" ")
            );
        }
        let _ = write!(
            svg,
            r##"<text x="{legend_x}" y="{}" font-size="11" fill="{color}" text-anchor="end">{name}</text>"##,
            top + 18.0
        );
        legend_x -= 90.0;
    }
}

/// The SVG text for `rows` (x axis: optimizer step).
pub fn svg(rows: &[MetricRow], title: &str) -> String {
    let max_x = rows.last().map_or(1.0, |r| r.step as f64);
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"##,
        2.0 * PANEL_H + 24.0
    );
    let loss: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.loss as f64)).collect();
    let eval: Vec<(f64, f64)> = rows.iter().filter_map(|r| r.eval_loss.map(|e| (r.step as f64, e as f64))).collect();
    let lr: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.lr as f64)).collect();
    panel(
        &mut s,
        0.0,
        &format!("loss — {title}"),
        &[("train loss", "#1f77b4", loss, false), ("eval loss", "#d62728", eval, true)],
        max_x,
    );
    panel(&mut s, PANEL_H, "learning rate", &[("lr", "#2ca02c", lr, false)], max_x);
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">step</text></svg>"##,
        W / 2.0,
        2.0 * PANEL_H + 16.0
    );
    s
}
