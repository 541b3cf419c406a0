//! One self-contained HTML page (no scripts, no network): the header and
//! summary of the text report, a growth chart (inline SVG) per top group
//! with whether it was still growing, and a table of every group with its
//! examples and stack.

use std::fmt::Write;

use crate::{culprit, header, summary, what, Group, Report};

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What a group's series says of it: still growing in the second half of
/// the trace, or flat since its last change.
pub fn trend(series: &[(f64, u64)], duration_s: f64) -> String {
    let Some(&(last_t, last)) = series.last() else {
        return String::new();
    };
    let half = duration_s / 2.0;
    let at_half = series
        .iter()
        .take_while(|(t, _)| *t <= half)
        .last()
        .map_or(0, |(_, n)| *n);
    if series.len() > 1 && last > at_half && last_t > half {
        format!("growing: {at_half} at {half:.1} s, {last} at {last_t:.1} s")
    } else {
        format!("plateaued: {last} since {last_t:.1} s")
    }
}

/// A step chart of `series` over `0..duration_s`.
fn chart(series: &[(f64, u64)], duration_s: f64) -> String {
    const W: f64 = 360.0;
    const H: f64 = 90.0;
    const LEFT: f64 = 40.0;
    const BOTTOM: f64 = 16.0;
    let max = series.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let span = duration_s
        .max(series.last().map_or(0.0, |(t, _)| *t))
        .max(1e-9);
    let x = |t: f64| LEFT + (t / span).clamp(0.0, 1.0) * (W - LEFT - 4.0);
    let y = |n: u64| 4.0 + (1.0 - n as f64 / max as f64) * (H - BOTTOM - 4.0);
    let mut points = format!("{:.1},{:.1}", x(0.0), y(0));
    let mut prev = 0;
    for (t, n) in series {
        let _ = write!(
            points,
            " {:.1},{:.1} {:.1},{:.1}",
            x(*t),
            y(prev),
            x(*t),
            y(*n)
        );
        prev = *n;
    }
    let _ = write!(points, " {:.1},{:.1}", x(span), y(prev));
    format!(
        "<svg class=\"chart\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         role=\"img\" aria-label=\"outstanding over time\">\
         <line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{W}\" y2=\"{b}\" class=\"axis\"/>\
         <line x1=\"{LEFT}\" y1=\"4\" x2=\"{LEFT}\" y2=\"{b}\" class=\"axis\"/>\
         <text x=\"{tx}\" y=\"12\" text-anchor=\"end\">{max}</text>\
         <text x=\"{tx}\" y=\"{b}\" text-anchor=\"end\">0</text>\
         <text x=\"{LEFT}\" y=\"{H}\">0 s</text>\
         <text x=\"{W}\" y=\"{H}\" text-anchor=\"end\">{span:.1} s</text>\
         <polyline points=\"{points}\"/></svg>",
        b = H - BOTTOM,
        tx = LEFT - 4.0,
    )
}

fn frame_line(f: &crate::StackFrame) -> String {
    let func = f.function.clone().unwrap_or_else(|| f.addr.clone());
    let loc = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(" {}:{line}", crate::basename(file)),
        _ => String::new(),
    };
    let module = f
        .module
        .as_deref()
        .map(|m| format!(" [{}]", crate::basename(m)))
        .unwrap_or_default();
    let inl = if f.inlined { " (inlined)" } else { "" };
    format!("{func}{inl}{loc}{module}")
}

fn title(g: &Group) -> String {
    let from = culprit(&g.stack)
        .and_then(|f| f.function.clone())
        .unwrap_or_else(|| "an unknown stack".into());
    format!("{} leaked from {from}", what(g))
}

/// The page. `growth[i]` is the series of `report.leaks[i]` (empty when
/// not known); charts are drawn for the first `top` groups.
pub fn render_html(report: &Report, growth: &[Vec<(f64, u64)>], top: usize) -> String {
    let mut o = String::new();
    let command = report.target.command.join(" ");
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>leakscope: {}</title><style>\
         body{{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:70em}}\
         pre,code{{font:13px ui-monospace,monospace}}\
         table{{border-collapse:collapse}}td,th{{padding:.2em .6em;border-bottom:1px solid #ddd;\
         text-align:left;vertical-align:top}}\
         .chart polyline{{fill:none;stroke:#c33;stroke-width:2}}.chart .axis{{stroke:#999}}\
         .chart text{{font-size:10px;fill:#555}}.group{{margin:1em 0}}.trend{{color:#555}}\
         </style></head><body>\n<h1>leakscope report: <code>{}</code></h1>\n<pre>",
        esc(&command),
        esc(&command)
    );
    for line in header(report) {
        let _ = writeln!(o, "{}", esc(&line));
    }
    let _ = writeln!(o, "\n{}</pre>", esc(&summary(report)));
    if !report.leaks.is_empty() {
        let _ = writeln!(o, "<h2>Growth of the top groups</h2>");
    }
    for (i, g) in report.leaks.iter().enumerate().take(top) {
        let series = growth.get(i).map_or(&[][..], Vec::as_slice);
        let _ = write!(
            o,
            "<div class=\"group\"><h3>[{}] {}</h3>",
            i + 1,
            esc(&title(g))
        );
        if series.is_empty() {
            let _ = writeln!(o, "<p class=\"trend\">no growth recorded</p></div>");
        } else {
            let _ = writeln!(
                o,
                "{}<p class=\"trend\">{}</p></div>",
                chart(series, report.duration_s),
                esc(&trend(series, report.duration_s))
            );
        }
    }
    let _ = writeln!(
        o,
        "<h2>All groups</h2>\n<table><tr><th>#</th><th>what</th><th>acquired by</th>\
         <th>first / last</th><th>examples and stack</th></tr>"
    );
    for (i, g) in report.leaks.iter().enumerate() {
        let mut details = String::new();
        for e in &g.examples {
            let what = match (e.fd, &e.addr, &e.detail) {
                (Some(fd), _, Some(d)) => format!("fd {fd} {d}"),
                (Some(fd), _, None) => format!("fd {fd}"),
                (None, Some(a), _) => format!("{a} ({} bytes)", e.size.unwrap_or(0)),
                _ => String::new(),
            };
            let _ = writeln!(details, "{}", esc(&what));
        }
        for (n, f) in g.stack.iter().enumerate() {
            let _ = writeln!(details, "#{n:<2} {}", esc(&frame_line(f)));
        }
        if let Some(note) = &g.stack_note {
            let _ = writeln!(details, "(stack {})", esc(note));
        }
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3} s / {:.3} s</td>\
             <td><details><summary>{}</summary><pre>{}</pre></details></td></tr>",
            i + 1,
            esc(&title(g)),
            esc(&g.acquired_by.join(", ")),
            g.first_s,
            g.last_s,
            esc(culprit(&g.stack).map_or("stack", |f| f.function.as_deref().unwrap_or("stack"))),
            details
        );
    }
    let _ = writeln!(o, "</table>");
    if !report.notes.is_empty() {
        let _ = writeln!(o, "<h2>Notes</h2><ul>");
        for n in &report.notes {
            let _ = writeln!(o, "<li>{}</li>", esc(n));
        }
        let _ = writeln!(o, "</ul>");
    }
    let _ = writeln!(o, "</body></html>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trends() {
        let drip = [(0.5, 1), (2.0, 2), (6.0, 3), (9.5, 4)];
        assert_eq!(trend(&drip, 10.0), "growing: 2 at 5.0 s, 4 at 9.5 s");
        let early = [(0.1, 11)];
        assert_eq!(trend(&early, 10.0), "plateaued: 11 since 0.1 s");
        let stopped = [(1.0, 5), (4.0, 9)];
        assert_eq!(trend(&stopped, 10.0), "plateaued: 9 since 4.0 s");
        assert_eq!(trend(&[], 10.0), "");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
    }
}
