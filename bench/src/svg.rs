//! The plot: latency percentiles per scenario at each open-loop rate (log scale), maximum
//! rate per scenario, and decision latency by bundle size. Plain SVG written by hand: a few
//! rectangles and labels do not need a plotting library.

use std::fmt::Write as _;

use crate::latency::Percentile;
use crate::report::{fmt_rate, Report};

const WIDTH: f64 = 980.0;
const LEFT: f64 = 190.0;
const RIGHT: f64 = 30.0;
const COLORS: [&str; 4] = ["#4e79a7", "#59a14f", "#f28e2b", "#e15759"];

/// Renders the report's plot as a standalone SVG document.
pub fn render(report: &Report) -> String {
    let mut body = String::new();
    let mut y = 60.0;
    for (i, rate) in report.method.rates.iter().enumerate() {
        let rows: Vec<(String, [f64; 4])> = report
            .scenarios
            .iter()
            .filter_map(|s| {
                let r = s.open_loop.iter().find(|r| r.rate == *rate)?;
                let m = &r.median.summary;
                Some((s.label.clone(), Percentile::ALL.map(|p| m.at(p))))
            })
            .collect();
        let title = format!(
            "Latency through Envoy at {} rps (open loop, median of {} run(s))",
            fmt_rate(*rate),
            report.method.repeats
        );
        y = latency_panel(&mut body, y, &title, &rows, i == 0);
    }
    let rps: Vec<(String, f64)> = report
        .scenarios
        .iter()
        .filter_map(|s| Some((s.label.clone(), s.closed_loop.as_ref()?.median.summary.rps)))
        .collect();
    if !rps.is_empty() {
        y = bar_panel(
            &mut body,
            y,
            "Maximum rate through Envoy (closed loop, requests/s)",
            &rps,
            "#76b7b2",
        );
    }
    let server: Vec<(String, f64)> = report
        .server_alone
        .iter()
        .filter_map(|s| {
            Some((
                format!("server alone, {}", s.label),
                s.closed_loop.as_ref()?.median.summary.rps,
            ))
        })
        .collect();
    if !server.is_empty() {
        y = bar_panel(
            &mut body,
            y,
            "Policy server alone, one core (closed loop, decisions/s)",
            &server,
            "#b07aa1",
        );
    }
    let scaling: Vec<(String, [f64; 4])> = report
        .policy_scaling
        .iter()
        .map(|s| {
            let m = &s.open_loop.median.summary;
            (
                format!(
                    "{} policies @{} rps",
                    fmt_rate(s.policies as f64),
                    fmt_rate(s.open_loop.rate)
                ),
                Percentile::ALL.map(|p| m.at(p)),
            )
        })
        .collect();
    if !scaling.is_empty() {
        let title = format!(
            "Decision latency by bundle size (server alone, at {} rps or half its maximum)",
            fmt_rate(report.method.scaling_rate)
        );
        y = latency_panel(&mut body, y, &title, &scaling, false);
    }
    let height = y + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="20" y="28" font-size="17" font-weight="bold">{}</text>"#,
        escape(&format!(
            "Arbiter benchmark {} ({} run)",
            report.date, report.kind
        ))
    );
    let _ = writeln!(
        svg,
        r##"<text x="20" y="46" fill="#555">{}</text>"##,
        escape(&report.machine.caveat)
    );
    svg.push_str(&body);
    let _ = writeln!(
        svg,
        r##"<text x="20" y="{}" fill="#555">{}</text>"##,
        height - 16.0,
        escape("Latency is measured from each request's intended send time. Envoy --concurrency 1 and the policy server share one CPU; the load generator and mock upstream use the other.")
    );
    svg.push_str("</svg>\n");
    svg
}

/// Grouped bars (p50, p90, p99, p99.9) per row on a log scale; returns the next y.
fn latency_panel(
    out: &mut String,
    top: f64,
    title: &str,
    rows: &[(String, [f64; 4])],
    legend: bool,
) -> f64 {
    let row_h = 44.0;
    let plot_top = top + 34.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let height = row_h * rows.len() as f64;
    let values = rows.iter().flat_map(|(_, v)| v.iter().copied());
    let max = values.clone().fold(0.0_f64, f64::max).max(0.01);
    let min = values.filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
    let lo = decade_floor(if min.is_finite() { min } else { 0.01 }).min(max / 10.0);
    let hi = decade_ceil(max);
    let x = |v: f64| {
        let v = v.max(lo);
        LEFT + (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_w
    };
    let _ = writeln!(
        out,
        r#"<text x="20" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        top + 18.0,
        escape(title)
    );
    if legend {
        for (i, p) in Percentile::ALL.iter().enumerate() {
            let lx = WIDTH - RIGHT - 320.0 + i as f64 * 80.0;
            let _ = writeln!(
                out,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                top + 8.0,
                COLORS[i],
                lx + 16.0,
                top + 18.0,
                p.label()
            );
        }
    }
    // Grid at 1, 2, 5 × 10^k ms.
    let mut tick = lo;
    while tick <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let t = tick * m;
            if t > hi * 1.0001 {
                break;
            }
            let tx = x(t);
            let _ = writeln!(
                out,
                r##"<line x1="{tx:.1}" y1="{plot_top:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                plot_top + height,
                plot_top + height + 14.0,
                fmt_ms(t)
            );
        }
        tick *= 10.0;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">ms (log scale)</text>"##,
        WIDTH - RIGHT,
        plot_top + height + 28.0
    );
    for (r, (label, values)) in rows.iter().enumerate() {
        let ry = plot_top + r as f64 * row_h;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            ry + row_h / 2.0 + 4.0,
            escape(label)
        );
        for (i, v) in values.iter().enumerate() {
            let by = ry + 4.0 + i as f64 * 9.0;
            let w = (x(*v) - LEFT).max(1.0);
            let _ = writeln!(
                out,
                r#"<rect x="{LEFT:.1}" y="{by:.1}" width="{w:.1}" height="8" fill="{}"><title>{} {}: {:.3} ms</title></rect>"#,
                COLORS[i],
                escape(label),
                Percentile::ALL[i].label(),
                v
            );
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#333">{:.3}</text>"##,
                LEFT + w + 3.0,
                by + 7.5,
                v
            );
        }
    }
    plot_top + height + 44.0
}

/// One bar per row on a linear scale; returns the next y.
fn bar_panel(out: &mut String, top: f64, title: &str, rows: &[(String, f64)], color: &str) -> f64 {
    let row_h = 24.0;
    let plot_top = top + 30.0;
    let plot_w = WIDTH - LEFT - RIGHT - 70.0;
    let max = rows
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let _ = writeln!(
        out,
        r#"<text x="20" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        top + 18.0,
        escape(title)
    );
    for (r, (label, v)) in rows.iter().enumerate() {
        let ry = plot_top + r as f64 * row_h;
        let w = (v / max * plot_w).max(1.0);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{LEFT:.1}" y="{:.1}" width="{w:.1}" height="16" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT - 8.0,
            ry + 13.0,
            escape(label),
            ry + 2.0,
            LEFT + w + 4.0,
            ry + 14.0,
            fmt_rate(*v)
        );
    }
    plot_top + row_h * rows.len() as f64 + 24.0
}

fn decade_floor(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

fn decade_ceil(v: f64) -> f64 {
    10f64.powf(v.log10().ceil())
}

fn fmt_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_owned()
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::Summary;
    use crate::report::{Measured, Method, RateResult, ScenarioResult};

    #[test]
    fn renders_every_scenario_and_escapes_labels() {
        let m = Measured {
            summary: Summary {
                ok: 10,
                p50_ms: 0.4,
                p90_ms: 0.6,
                p99_ms: 1.5,
                p999_ms: 12.0,
                rps: 1000.0,
                ..Summary::default()
            },
            ..Measured::default()
        };
        let run = RateResult {
            rate: 1000.0,
            share_of_ext_authz: None,
            median: m.clone(),
            repeats: vec![m],
        };
        let report = Report {
            date: "2026-11-22".into(),
            kind: "full".into(),
            method: Method {
                rates: vec![1000.0],
                repeats: 1,
                ..Method::default()
            },
            scenarios: vec![ScenarioResult {
                id: "a".into(),
                label: "arbiter <write> & co".into(),
                open_loop: vec![run.clone()],
                closed_loop: Some(run),
                ..ScenarioResult::default()
            }],
            ..Report::default()
        };
        let svg = render(&report);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("arbiter &lt;write&gt; &amp; co"));
        assert!(svg.contains("1,000 rps"));
        assert_eq!(svg.matches("<title>").count(), 4);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(fmt_ms(0.1), "0.1");
        assert_eq!(fmt_ms(0.25), "0.25");
        assert_eq!(fmt_ms(2.0), "2");
        assert_eq!(decade_floor(0.37), 0.1);
        assert_eq!(decade_ceil(3.7), 10.0);
    }
}
