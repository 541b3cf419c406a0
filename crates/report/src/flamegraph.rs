//! Flame graph SVG of outstanding resources (inferno), from folded
//! stacks: one line per leak group, outermost frame first under a root
//! frame naming the kind (`fd:socket`, `heap`), weighted by count.

use crate::{Report, StackFrame};

fn name(f: &StackFrame) -> String {
    let n = match &f.function {
        Some(n) => n.clone(),
        None => format!(
            "{}+{}",
            f.module.as_deref().map_or("?", crate::basename),
            f.addr
        ),
    };
    // `;` separates frames and the last space the count in folded lines.
    n.replace(';', ":").replace(' ', "\u{a0}")
}

/// The folded stacks (`root;outer;...;inner COUNT`), one per group.
pub fn folded(report: &Report) -> Vec<String> {
    report
        .leaks
        .iter()
        .map(|g| {
            let mut frames = vec![if g.kind == "fd" {
                format!("fd:{}", g.resource)
            } else {
                g.kind.clone()
            }];
            frames.extend(g.stack.iter().rev().map(name));
            format!("{} {}", frames.join(";"), g.count)
        })
        .collect()
}

/// The flame graph, an SVG document.
pub fn render_svg(report: &Report) -> String {
    let lines = folded(report);
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = format!(
        "Outstanding resources of {}",
        report.target.command.join(" ")
    );
    opt.count_name = "resources".into();
    opt.name_type = "Frame:".into();
    let mut out = Vec::new();
    if lines.is_empty() {
        // inferno refuses an empty graph: say so in a valid document.
        return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"40\">\
                <text x=\"10\" y=\"25\">No leaks found</text></svg>\n"
            .into();
    }
    inferno::flamegraph::from_lines(&mut opt, lines.iter().map(String::as_str), &mut out)
        .expect("folded lines of our own making");
    String::from_utf8(out).expect("inferno writes UTF-8")
}
