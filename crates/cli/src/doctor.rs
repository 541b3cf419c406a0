//! `leakscope doctor`: which backend works on this machine, and why not.
//! Each eBPF object is loaded and attached for real (then detached), so
//! the verifier's verdict and cost are measured, not guessed; the preload
//! shim is tried on a launched program.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use leakscope_bpf::{Host, LoadReport};
use leakscope_event::Event;
use serde_json::{json, Value};

use crate::exit;

/// The project's budget for the verifier's processed instructions of any
/// one program (issue 9; its limit is 1,000,000).
pub const INSN_BUDGET: u32 = 100_000;
/// The project's budget for the CPU time of loading every program.
pub const LOAD_CPU_BUDGET: Duration = Duration::from_millis(500);

pub const AFTER_HELP: &str = "\
Every eBPF backend's programs are loaded and attached for real (then
detached; nothing is traced): for each program, the instructions the
verifier processed (bpf_prog_info.verified_insns, Linux 5.16) and the
kernel's verification time. The preload shim is tried on a launched program,
and the ptrace backend on a launched /bin/true (its seccomp filter and
PTRACE_GET_SYSCALL_INFO), with which processes `attach` may trace with it
(Yama's ptrace_scope, CAP_SYS_PTRACE). The JSON field names are stable.

Exit status: 0 when at least one backend works, 1 when none does, 125 when
leakscope failed (bad usage, stdout not writable).

EXAMPLES:
  sudo leakscope doctor
  leakscope doctor --format json | jq '.backends[] | {name, works, reason}'";

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum DoctorFormat {
    /// A table, 80 columns.
    Text,
    /// One JSON object.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = DoctorFormat::Text)]
    format: DoctorFormat,
}

/// One backend's verdict.
struct Check {
    /// Stable id (JSON `name`).
    name: &'static str,
    /// Shown in the table.
    title: &'static str,
    /// Which commands and options use it.
    used_by: &'static str,
    /// Why it does not work; None when it does.
    reason: Option<String>,
    /// What was checked, when it works without programs to list.
    detail: Option<String>,
    /// The eBPF load, for eBPF backends.
    load: Option<LoadReport>,
    /// Facts of its own, in JSON under the backend's name (`ptrace`).
    facts: Option<Value>,
}

fn ebpf(
    name: &'static str,
    title: &'static str,
    used_by: &'static str,
    mut load: LoadReport,
) -> Check {
    Check {
        name,
        title,
        used_by,
        reason: load.error.take().map(|e| e.to_string()),
        detail: None,
        load: Some(load),
        facts: None,
    }
}

/// Launches a small dynamically linked program (leakscope itself, with
/// `--version`) under the shim and waits for the shim's report of it.
fn preload() -> Check {
    let mut check = Check {
        name: "preload",
        title: "preload heap shim",
        used_by: "run: heap of launched commands",
        reason: None,
        detail: None,
        load: None,
        facts: None,
    };
    let outcome = (|| -> Result<PathBuf, String> {
        let shim = leakscope_preload::shim_path().map_err(|e| e.to_string())?;
        let mut backend =
            leakscope_preload::Preload::with_shim(shim.clone()).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find leakscope: {e}"))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = backend
            .spawn(&mut cmd)
            .map_err(|e| format!("cannot launch {}: {e}", exe.display()))?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut reported = false;
        while !reported && Instant::now() < deadline {
            backend
                .poll(Duration::from_millis(50), &mut |e| {
                    if matches!(e, Event::HeapEnd { pid: p, .. } if p.0 == pid) {
                        reported = true;
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        let _ = child.kill();
        let _ = child.wait();
        if !reported {
            return Err(format!(
                "{} was preloaded into a launched program (leakscope --version) \
                 but never reported to leakscope",
                shim.display()
            ));
        }
        Ok(shim)
    })();
    match outcome {
        Ok(shim) => {
            check.detail = Some(format!(
                "{}: a launched program reported its heap through it",
                shim.display()
            ))
        }
        Err(e) => check.reason = Some(e),
    }
    check
}

/// Traces a launched `/bin/true` with the ptrace backend (seccomp filter,
/// PTRACE_GET_SYSCALL_INFO), and says which running processes `attach`
/// may trace with it here (Yama's ptrace_scope, CAP_SYS_PTRACE).
fn ptrace() -> Check {
    let f = leakscope_ptrace::facts();
    let yes_no = |b: bool| if b { "yes" } else { "NO" };
    let info = match f.syscall_info {
        Some(true) => "works",
        Some(false) => "FAILS (Linux 5.3 or later needed)",
        None => "not tried",
    };
    let scope = f
        .ptrace_scope
        .map_or_else(|| "no Yama".to_string(), |v| format!("ptrace_scope={v}"));
    let attach = match &f.launch {
        Ok(()) => f.attach_scope(),
        Err(_) => "none",
    };
    let detail = format!(
        "{}; seccomp filters: {}; PTRACE_GET_SYSCALL_INFO: {info}; {scope}; attach \
         (every syscall stops the process, no filter can be added to it): {attach}",
        match f.launch {
            Ok(()) => "a launched /bin/true was traced, only its fd syscalls stopping it",
            Err(_) => "launch failed",
        },
        yes_no(f.seccomp_filter),
    );
    Check {
        name: "ptrace",
        title: "ptrace fds",
        used_by: "run, attach: fds without root",
        reason: f.launch.clone().err(),
        detail: Some(detail),
        load: None,
        facts: Some(json!({
            "ptrace_scope": f.ptrace_scope,
            "seccomp_filter": f.seccomp_filter,
            "syscall_info": f.syscall_info,
            "cap_sys_ptrace": f.cap_sys_ptrace,
            "no_new_privs": f.no_new_privs,
            "attach": attach,
        })),
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let host = Host::current();
    let checks = vec![
        ebpf(
            "ebpf-fd",
            "ebpf fds+tcp",
            "run, attach: fds, TCP states",
            leakscope_ebpf::check_load(leakscope_ebpf::Config { tcp: true }),
        ),
        ebpf(
            "ebpf-snoop",
            "ebpf snoop",
            "snoop",
            leakscope_snoop::check_load(),
        ),
        ebpf(
            "ebpf-uheap",
            "ebpf uprobes heap",
            "attach --track heap",
            leakscope_uheap::check_load(Default::default()),
        ),
        preload(),
        ptrace(),
    ];
    // The fd and heap loaders mount tracefs when it is missing.
    let tracefs_now = Host::current().tracefs;
    let text = match args.format {
        DoctorFormat::Text => render_text(&host, tracefs_now.as_ref(), &checks),
        DoctorFormat::Json => {
            let mut s =
                serde_json::to_string_pretty(&render_json(&host, tracefs_now.as_ref(), &checks))?;
            s.push('\n');
            s
        }
    };
    crate::write_report(Some(std::path::Path::new("-")), &text)?;
    Ok(if checks.iter().any(|c| c.reason.is_none()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::NO_BACKEND)
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn total_cpu(checks: &[Check]) -> Duration {
    checks
        .iter()
        .filter_map(|c| c.load.as_ref())
        .map(|l| l.cpu)
        .sum()
}

fn tracefs_state(host: &Host, now: Option<&PathBuf>) -> String {
    match (&host.tracefs, now) {
        (Some(at), _) => format!("mounted at {}", at.display()),
        (None, Some(at)) => format!("was not mounted; leakscope mounted it at {}", at.display()),
        (None, None) => "not mounted (leakscope mounts it at /sys/kernel/tracing when \
                         allowed)"
            .into(),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "unknown".to_string(), |v| v.to_string())
}

/// `text` folded at 80 columns, each line indented by `indent` spaces.
fn wrap(text: &str, indent: usize, out: &mut String) {
    let width = 80 - indent;
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            out.push_str(&format!("{:indent$}{line}\n", ""));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{:indent$}{line}\n", ""));
    }
}

fn render_text(host: &Host, tracefs_now: Option<&PathBuf>, checks: &[Check]) -> String {
    let mut s = format!(
        "leakscope doctor on {} ({})\n\n",
        host.release, host.machine
    );
    let user = if host.euid == 0 {
        "root (euid 0)".to_string()
    } else {
        format!("euid {}", host.euid)
    };
    let facts = [
        (
            "user",
            format!("{user}; capabilities: {}", host.capability_names()),
        ),
        (
            "BTF",
            format!(
                "{} {}",
                leakscope_bpf::VMLINUX_BTF,
                if host.btf { "present" } else { "ABSENT" }
            ),
        ),
        ("tracefs", tracefs_state(host, tracefs_now)),
        (
            "lockdown",
            host.lockdown.clone().unwrap_or_else(|| {
                "unknown (/sys/kernel/security/lockdown is not readable)".into()
            }),
        ),
        (
            "sysctl",
            format!(
                "kernel.unprivileged_bpf_disabled={} kernel.perf_event_paranoid={}",
                opt(&host.unprivileged_bpf_disabled),
                opt(&host.perf_event_paranoid)
            ),
        ),
        (
            "",
            format!(
                "kernel.yama.ptrace_scope={}",
                host.ptrace_scope
                    .map_or_else(|| "(no Yama)".to_string(), |v| v.to_string())
            ),
        ),
    ];
    for (k, v) in facts {
        s.push_str(&format!("  {k:<10} {v}\n"));
    }
    s.push_str(&format!("\n{:<20} {:<6} USED BY\n", "BACKEND", "WORKS"));
    for c in checks {
        let works = if c.reason.is_none() { "yes" } else { "NO" };
        s.push_str(&format!("{:<20} {:<6} {}\n", c.title, works, c.used_by));
        if let Some(r) = &c.reason {
            wrap(r, 4, &mut s);
        }
        if let Some(d) = &c.detail {
            wrap(d, 4, &mut s);
        }
        if let Some(load) = &c.load {
            if !load.programs.is_empty() {
                s.push_str(&format!(
                    "    {:<28} {:>9} {:>10}\n",
                    "program", "insns", "verify ms"
                ));
            }
            for p in &load.programs {
                let note = match (p.loaded, p.verified_insns) {
                    (false, _) => "  rejected",
                    (true, Some(n)) if n > INSN_BUDGET => "  over budget",
                    _ => "",
                };
                s.push_str(&format!(
                    "    {:<28} {:>9} {:>10}{note}\n",
                    p.name,
                    opt(&p.verified_insns),
                    p.verify_time
                        .map_or_else(|| "?".to_string(), |t| format!("{:.1}", ms(t)))
                ));
            }
            s.push_str(&format!(
                "    load: {:.1} ms wall, {:.1} ms CPU\n",
                ms(load.wall),
                ms(load.cpu)
            ));
        }
    }
    let working = checks.iter().filter(|c| c.reason.is_none()).count();
    let largest = checks
        .iter()
        .filter_map(|c| Some((c.name, c.load.as_ref()?)))
        .flat_map(|(backend, l)| l.programs.iter().map(move |p| (backend, p)))
        .filter_map(|(backend, p)| Some((p.verified_insns?, format!("{backend}/{}", p.name))))
        .max();
    s.push_str(&format!(
        "\n{working} of {} backends work. eBPF loads took {:.2} s of CPU (budget {:.1} s)",
        checks.len(),
        total_cpu(checks).as_secs_f64(),
        LOAD_CPU_BUDGET.as_secs_f64()
    ));
    match largest {
        Some((n, name)) => s.push_str(&format!(
            ";\nthe largest program is {name}, {n} insns (budget {INSN_BUDGET}).\n"
        )),
        None => s.push_str(".\n"),
    }
    s
}

fn render_json(host: &Host, tracefs_now: Option<&PathBuf>, checks: &[Check]) -> Value {
    let caps: Vec<&str> = [
        (host.cap_bpf, "CAP_BPF"),
        (host.cap_perfmon, "CAP_PERFMON"),
        (host.cap_sys_admin, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| n)
    .collect();
    let backends: Vec<Value> = checks
        .iter()
        .map(|c| {
            let mut b = json!({
                "name": c.name,
                "title": c.title,
                "used_by": c.used_by,
                "works": c.reason.is_none(),
                "reason": c.reason,
                "detail": c.detail,
                "load_ms": null,
                "load_cpu_ms": null,
                "programs": [],
            });
            if let Some(facts) = &c.facts {
                b[c.name] = facts.clone();
            }
            if let Some(load) = &c.load {
                b["load_ms"] = json!(ms(load.wall));
                b["load_cpu_ms"] = json!(ms(load.cpu));
                b["programs"] = load
                    .programs
                    .iter()
                    .map(|p| {
                        json!({
                            "name": p.name,
                            "verified_insns": p.verified_insns,
                            "verify_ms": p.verify_time.map(ms),
                            "loaded": p.loaded,
                        })
                    })
                    .collect();
            }
            b
        })
        .collect();
    json!({
        "version": 1,
        "kernel": {"release": host.release, "machine": host.machine},
        "host": {
            "euid": host.euid,
            "capabilities": caps,
            "btf": host.btf,
            "tracefs": host.tracefs,
            "tracefs_now": tracefs_now,
            "lockdown": host.lockdown,
            "unprivileged_bpf_disabled": host.unprivileged_bpf_disabled,
            "perf_event_paranoid": host.perf_event_paranoid,
            "ptrace_scope": host.ptrace_scope,
        },
        "budget": {
            "verified_insns_per_program": INSN_BUDGET,
            "load_cpu_ms": ms(LOAD_CPU_BUDGET),
        },
        "backends": backends,
        "load_cpu_ms_total": ms(total_cpu(checks)),
        "working_backends": checks.iter().filter(|c| c.reason.is_none()).count(),
    })
}
