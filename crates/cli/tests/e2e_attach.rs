//! `leakscope attach` on a running process: leaks made after attaching
//! (also by children forked after it) are found with their stacks; what was
//! open before is listed apart and never counted.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use leakscope_testutil::{require_root, workspace_root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

/// Compiles `fixtures/<src>` into target/fixtures with `flags`.
fn compile(src: &str, name: &str, flags: &[&str]) -> std::path::PathBuf {
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(format!("{name}-{}", std::process::id()));
    let st = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(workspace_root().join("fixtures").join(src))
        .status()
        .expect("cc");
    assert!(st.success());
    bin
}

/// A running target: its stdin, its stdout, and the pid it printed first.
struct Target {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: BufReader<std::process::ChildStdout>,
    pid: u32,
}

fn start_target(bin: &std::path::Path) -> Target {
    let mut child = Command::new(bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start target");
    let to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    let pid = line.trim().parse().expect("pid line");
    Target {
        child,
        to,
        from,
        pid,
    }
}

/// `leakscope attach -p PID ARGS --format json -o OUT`, once it says it is
/// tracing; returns it, its stderr, and that first line.
fn start_attach(
    pid: u32,
    args: &[&str],
    out: &std::path::Path,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    String,
) {
    let mut ls = Command::new(BIN)
        .args(["attach", "-p", &pid.to_string()])
        .args(args)
        .args(["--format", "json", "-o"])
        .arg(out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leakscope attach");
    let mut err = BufReader::new(ls.stderr.take().unwrap());
    let mut ready = String::new();
    err.read_line(&mut ready).unwrap();
    (ls, err, ready)
}

fn build_target() -> std::path::PathBuf {
    compile("attach/attach_target.c", "attach_target", &["-g", "-O2"])
}

fn functions(g: &Value) -> Vec<&str> {
    g["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect()
}

#[test]
fn root_attach_finds_new_leaks_and_lists_old_fds_apart() {
    if !require_root("root_attach_finds_new_leaks_and_lists_old_fds_apart") {
        return;
    }
    let bin = build_target();
    let Target {
        child: mut target,
        mut to,
        mut from,
        pid,
    } = start_target(&bin);
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    // "ready 3 4 5": the fds before_attach() opened (not always 3, 4, 5:
    // whoever runs the tests may pass down fds of its own).
    let opened: Vec<i64> = line
        .trim()
        .strip_prefix("ready")
        .unwrap_or_else(|| panic!("not ready: {line}"))
        .split_whitespace()
        .map(|fd| fd.parse().expect("fd number"))
        .collect();
    assert_eq!(opened.len(), 3, "{line}");

    let out_path = std::env::temp_dir().join(format!("leakscope-attach-{pid}.json"));
    let (mut ls, mut err, ready) = start_attach(pid, &[], &out_path);
    assert!(ready.starts_with("Tracing fds of pid"), "{ready}");

    let mut say = |cmd: &str| {
        writeln!(to, "{cmd}").unwrap();
        let mut ack = String::new();
        from.read_line(&mut ack).unwrap();
        assert_eq!(ack.trim(), "ok", "{cmd}");
    };
    say("fork 5");
    say("leak 7");
    say("churn 101");
    writeln!(to, "quit").unwrap();
    assert!(target.wait().unwrap().success());
    let st = ls.wait().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert_eq!(st.code(), Some(0), "leakscope attach: {rest}");

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&bin);
    assert_eq!(r["target"]["pid"].as_u64(), Some(pid as u64));
    assert_eq!(r["target"]["exit_code"], 0);
    assert_eq!(r["events"]["lost"], 0);
    let mut counts = std::collections::BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        let f = functions(g);
        let who = ["drip", "child_drip", "balanced", "before_attach"]
            .into_iter()
            .find(|n| f.contains(n))
            .unwrap_or_else(|| panic!("unexplained leak group: {g}"));
        *counts.entry(who).or_insert(0) += g["count"].as_u64().unwrap();
    }
    assert_eq!(
        counts,
        std::collections::BTreeMap::from([("child_drip", 5), ("drip", 7)])
    );
    let before: Vec<i64> = r["preexisting"]
        .as_array()
        .expect("preexisting list")
        .iter()
        .filter(|p| p["detail"] == "/dev/null")
        .map(|p| p["fd"].as_i64().unwrap())
        .collect();
    // (the test harness may pass down more /dev/null fds of its own)
    assert!(
        opened.iter().all(|fd| before.contains(fd)),
        "the 3 fds from before_attach, {opened:?}, listed apart: {before:?}"
    );
}

#[test]
fn attach_to_a_missing_pid_is_a_one_line_error() {
    let out = Command::new(BIN)
        .args(["attach", "-p", "999999999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no such process"), "{err}");
}

/// Heap of a running process through allocator uprobes: exact leaks per
/// function; blocks allocated before the attach and freed after it are
/// neither leaks nor errors.
#[test]
fn root_attach_heap() {
    if !require_root("root_attach_heap") {
        return;
    }
    let bin = compile(
        "uheap/uheap_target.c",
        "uheap_target",
        &["-g", "-O2", "-fomit-frame-pointer"],
    );
    let Target {
        child: mut target,
        mut to,
        mut from,
        pid,
    } = start_target(&bin);
    let mut line = String::new();

    let out_path = std::env::temp_dir().join(format!("leakscope-attach-heap-{pid}.json"));
    let (mut ls, mut err, ready) = start_attach(pid, &["--track", "heap"], &out_path);
    assert!(ready.starts_with("Tracing heap of pid"), "{ready}");
    writeln!(to, "go").unwrap();
    line.clear();
    from.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    writeln!(to, "quit").unwrap();
    assert!(target.wait().unwrap().success());
    let st = ls.wait().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert_eq!(st.code(), Some(0), "{rest}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&bin);
    let mut got = std::collections::BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        assert_eq!(g["kind"], "heap");
        let f = functions(g);
        let Some(who) = ["wrapper1", "grow_buffer", "aligned_leak", "zeroed_leak"]
            .into_iter()
            .find(|n| f.contains(n))
        else {
            // glibc keeps thread descriptors (allocate_dtv) cached: not ours
            // to judge, but nothing from the fixture's balanced code.
            assert!(
                !f.contains(&"balanced") && !f.contains(&"before_attach"),
                "{g}"
            );
            continue;
        };
        let e = got.entry(who).or_insert((0, 0));
        e.0 += g["count"].as_u64().unwrap();
        e.1 += g["bytes"].as_u64().unwrap();
    }
    assert_eq!(
        got,
        std::collections::BTreeMap::from([
            ("aligned_leak", (5, 400)),
            ("grow_buffer", (7, 672)),
            ("wrapper1", (13, 832)),
            ("zeroed_leak", (3, 72)),
        ])
    );
}
