//! End to end under the ptrace backend (issue 13): every fd fixture traced
//! with `--backend ptrace` must give its documented leaks with their
//! acquiring functions, without root; the traced command's exit status,
//! signals and stdout stay its own; and (as root) the same leak groups as
//! the eBPF backend, fixture by fixture.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use leakscope_testutil::{expected_leaks, fixture, require_root, test_user, TEST_USER};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

/// The fixtures with fd leaks.
const FD_FIXTURES: &[&str] = &[
    "fd_leak",
    "fd_kinds",
    "net_leak",
    "fork_exec",
    "settle",
    "threads",
    "close_range",
    "short_lived",
    "static_leak",
    "demo",
    "deep_stack",
    "short_names",
];

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "leakscope-ptrace-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `leakscope run --track fd --backend BACKEND --format json -- cmd`.
fn report(backend: &str, cmd: &[&str]) -> Value {
    let dir = tempdir();
    let out_path = dir.join("report.json");
    let mut args = vec![
        "run",
        "--backend",
        backend,
        "--track",
        "fd",
        "--format",
        "json",
        "-o",
        out_path.to_str().unwrap(),
        "--",
    ];
    args.extend_from_slice(cmd);
    let out = Command::new(BIN)
        .args(&args)
        .output()
        .expect("run leakscope");
    let text = std::fs::read_to_string(&out_path).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); status {:?}, stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_dir_all(&dir);
    serde_json::from_str(&text).expect("valid JSON")
}

/// The fixture function that acquired a group: the first frame of the
/// fixture's own code.
fn acquirer(group: &Value, names: &[&str]) -> Option<String> {
    group["stack"]
        .as_array()?
        .iter()
        .filter_map(|f| f["function"].as_str())
        .find(|f| names.contains(f))
        .map(str::to_string)
}

/// (kind, resource, acquiring function) -> count, for a report of `name`.
fn groups(name: &str, r: &Value) -> BTreeMap<(String, String, String), u64> {
    let names: Vec<&str> = expected_leaks(name).iter().map(|e| e.function).collect();
    let mut out = BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        let f = acquirer(g, &names).unwrap_or_else(|| {
            format!(
                "<none: {}>",
                serde_json::to_string(&g["stack"]).unwrap_or_default()
            )
        });
        let key = (
            g["kind"].as_str().unwrap().to_string(),
            g["resource"].as_str().unwrap().to_string(),
            f,
        );
        *out.entry(key).or_default() += g["count"].as_u64().unwrap();
    }
    out
}

fn want(name: &str) -> BTreeMap<(String, String, String), u64> {
    let mut want = BTreeMap::new();
    for e in expected_leaks(name) {
        *want
            .entry(("fd".into(), e.kind.into(), e.function.into()))
            .or_default() += e.count as u64;
    }
    want
}

fn check_ptrace(name: &str) {
    let r = report("ptrace", &[fixture(name).to_str().unwrap()]);
    assert_eq!(r["backend"], "ptrace", "{name}");
    assert_eq!(r["events"]["lost"], 0, "{name}: events lost");
    assert_eq!(r["target"]["exit_code"], 0, "{name}: the fixture failed");
    assert_eq!(
        groups(name, &r),
        want(name),
        "{name}: leaks by acquiring function"
    );
}

macro_rules! ptrace_tests {
    ($($test:ident => $name:expr),* $(,)?) => {$(
        #[test]
        fn $test() {
            check_ptrace($name);
        }
    )*};
}

ptrace_tests! {
    ptrace_fd_leak => "fd_leak",
    ptrace_fd_kinds => "fd_kinds",
    ptrace_net_leak => "net_leak",
    ptrace_fork_exec => "fork_exec",
    ptrace_settle => "settle",
    ptrace_threads => "threads",
    ptrace_close_range => "close_range",
    ptrace_short_lived => "short_lived",
    ptrace_static_leak => "static_leak",
    ptrace_demo => "demo",
    ptrace_deep_stack => "deep_stack",
    ptrace_short_names => "short_names",
}

/// Stacks through libc are unwound from the copied stack with DWARF CFI:
/// the libc function, then the fixture's caller, then main.
#[test]
fn ptrace_stack_goes_through_libc() {
    let r = report("ptrace", &[fixture("fd_leak").to_str().unwrap()]);
    let g = r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| acquirer(g, &["load_config"]).is_some())
        .expect("load_config's group");
    let funcs: Vec<&str> = g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    let at = |f: &str| funcs.iter().position(|x| *x == f);
    assert!(
        matches!((at("fopen").or(at("_IO_new_fopen")).or(at("__fopen_internal")), at("load_config"), at("main")), (Some(a), Some(b), Some(c)) if a < b && b < c),
        "stack {funcs:?}"
    );
    assert_eq!(g["acquired_by"][0], "openat");
}

fn run_traced(args: &[&str]) -> Output {
    let mut all = vec!["run", "--backend", "ptrace", "--track", "fd", "--"];
    all.extend_from_slice(args);
    Command::new(BIN)
        .args(&all)
        .output()
        .expect("run leakscope")
}

/// The traced program must not notice: its exit code, its stdout, and
/// signals sent to it (handled, or fatal) are its own.
#[test]
fn ptrace_program_keeps_its_status_signals_and_stdout() {
    let out = run_traced(&["sh", "-c", "echo hello; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");

    // A handled signal reaches the handler (delivered back on restart).
    let out = run_traced(&[
        "sh",
        "-c",
        "trap 'echo got USR1; exit 9' USR1; kill -USR1 $$; sleep 5",
    ]);
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got USR1\n");

    // A fatal one kills it, and leakscope reports it the same way.
    use std::os::unix::process::ExitStatusExt;
    let out = run_traced(&["sh", "-c", "kill -TERM $$; sleep 5"]);
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{out:?}");

    // A job-control stop and SIGCONT: the program runs on to its end.
    let out = run_traced(&[
        "sh",
        "-c",
        "sh -c 'kill -STOP $$; echo resumed' & sleep 0.3; kill -CONT $!; wait",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "resumed\n");

    // Fd numbers are the program's: 3 is free in it as it would be untraced.
    let out = run_traced(&[
        "sh",
        "-c",
        "exec 3</dev/null; ls -l /proc/self/fd/ | grep -c ' 3 ->'",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// The same leak groups under both fd backends, fixture by fixture: kind,
/// count and acquiring function.
#[test]
fn root_differential_ebpf_and_ptrace() {
    if !require_root("root_differential_ebpf_and_ptrace") {
        return;
    }
    let mut differ = Vec::new();
    for name in FD_FIXTURES {
        let bin = fixture(name);
        let bin = bin.to_str().unwrap();
        let ebpf = groups(name, &report("ebpf", &[bin]));
        let ptrace = groups(name, &report("ptrace", &[bin]));
        if ebpf != ptrace {
            differ.push(format!("{name}:\n  ebpf   {ebpf:?}\n  ptrace {ptrace:?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "leak groups differ:\n{}",
        differ.join("\n")
    );
}

/// A directory everyone may use, holding copies of leakscope, the shim
/// and the fd fixtures.
fn unprivileged_dir() -> std::path::PathBuf {
    let dir = tempdir();
    leakscope_testutil::ensure_shim(std::path::Path::new(BIN));
    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
    for f in ["leakscope", leakscope_preload::SHIM_NAME] {
        std::fs::copy(bin_dir.join(f), dir.join(f)).unwrap();
    }
    for name in FD_FIXTURES {
        std::fs::copy(fixture(name), dir.join(name)).unwrap();
    }
    let chmod = Command::new("chmod")
        .arg("-R")
        .arg("a+rwx")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(chmod.success());
    dir
}

fn as_user(uid: u32, gid: u32, dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(dir.join("leakscope"))
        .args(args)
        .current_dir(dir)
        .env("TMPDIR", dir)
        .output()
        .expect("setpriv (util-linux)")
}

/// As an ordinary user (created for the test), where eBPF cannot be
/// loaded: every fd fixture is traced with ptrace, by name and by
/// `--backend auto`, which says once why it did not use eBPF (the
/// kernel's reason); and a plain `run` traces fds and the heap together.
#[test]
fn root_as_an_ordinary_user_fds_are_traced_with_ptrace() {
    if !require_root("root_as_an_ordinary_user_fds_are_traced_with_ptrace") {
        return;
    }
    let (uid, gid) = test_user();
    let dir = unprivileged_dir();
    let out_path = dir.join("report.json");
    let json = |backend: &str, track: &str, name: &str| -> Value {
        let _ = std::fs::remove_file(&out_path);
        let out = as_user(
            uid,
            gid,
            &dir,
            &[
                "run",
                "--backend",
                backend,
                "--track",
                track,
                "--format",
                "json",
                "-o",
                out_path.to_str().unwrap(),
                "--",
                &format!("./{name}"),
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name} as {TEST_USER}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).expect("JSON")
    };
    for name in FD_FIXTURES {
        let r = json("ptrace", "fd", name);
        assert_eq!(groups(name, &r), want(name), "{name} as {TEST_USER}");
    }
    let r = json("auto", "fd", "fd_leak");
    assert_eq!(r["backend"], "ptrace");
    assert_eq!(groups("fd_leak", &r), want("fd_leak"));
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| n.contains("eBPF"))
        .collect();
    assert_eq!(notes.len(), 1, "said once: {notes:?}");
    assert!(
        notes[0].starts_with("fds traced with ptrace: eBPF could not be used: ")
            && notes[0].contains("CAP_BPF"),
        "with the kernel's reason: {}",
        notes[0]
    );
    let r = json("auto", "fd,heap", "fd_leak");
    assert_eq!(r["backend"], "ptrace+preload");
    let traced: Vec<&Value> = r["coverage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["traced"])
        .collect();
    assert_eq!(
        traced[..2],
        [&Value::from("all"), &Value::from("all")],
        "{:#}",
        r["coverage"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where neither fd backend can be used (no root for eBPF, and ptrace
/// denied by a seccomp policy, as in a container without CAP_SYS_PTRACE:
/// `fixtures/ptrace/no_ptrace.c`), `run --track fd` and `attach` fail
/// with 125 in one sentence giving both reasons and what to change; a
/// plain `run` traces the heap and its report says why fds were not.
#[test]
fn root_nothing_can_trace_fds_says_what_to_change() {
    if !require_root("root_nothing_can_trace_fds_says_what_to_change") {
        return;
    }
    let (uid, gid) = test_user();
    let dir = unprivileged_dir();
    let wrapper = dir.join("no_ptrace");
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&wrapper)
        .arg(leakscope_testutil::workspace_root().join("fixtures/ptrace/no_ptrace.c"))
        .status()
        .expect("cc");
    assert!(st.success());
    let run = |args: &[&str]| -> Output {
        let mut all = vec!["./leakscope"];
        all.extend_from_slice(args);
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(&wrapper)
            .args(&all)
            .current_dir(&dir)
            .env("TMPDIR", &dir)
            .output()
            .expect("setpriv (util-linux)")
    };
    let one_sentence = |out: &Output, what: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        for part in [
            "leakscope: error: ",
            "nothing can trace fds here: eBPF could not be used (",
            "CAP_BPF",
            "is refused (EPERM) by a seccomp policy",
            "allow the ptrace syscall",
            "or run leakscope as root",
        ] {
            assert!(err.contains(part), "{what}: no {part:?} in {err}");
        }
    };
    one_sentence(&run(&["run", "--track", "fd", "--", "./fd_leak"]), "run");

    let mut own = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    let out = run(&["attach", "-p", &own.id().to_string()]);
    let _ = own.kill();
    let _ = own.wait();
    one_sentence(&out, "attach");

    // Not asked for by name: the heap is traced, the report says why
    // fds were not.
    let out_path = dir.join("report.json");
    let out = run(&[
        "run",
        "--format",
        "json",
        "-o",
        out_path.to_str().unwrap(),
        "--",
        "./fd_leak",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let fd = &r["coverage"][0];
    assert_eq!((&fd["kind"], &fd["traced"]), (&"fd".into(), &"none".into()));
    let why = fd["reason"].as_str().unwrap();
    assert!(
        why.starts_with("nothing can trace fds here") && why.contains("seccomp policy"),
        "{why}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
