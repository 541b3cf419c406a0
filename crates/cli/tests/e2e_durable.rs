//! End to end: nothing a process allocated is lost because of how it
//! ended (`_exit`, `abort`, SIGKILL, a crash), nor because it closed every
//! fd it had (the shim's connection included): the preload backend's
//! records live in a journal the collector reads after the process is
//! gone, and the shim connects again when its connection was closed.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use leakscope_testutil::heap_fixture;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

/// Runs `leakscope run` on the heap alone; returns how it exited (its
/// code, or the signal it killed itself with as the command died: 1000 +
/// the signal) and the JSON report.
fn run(cmd: &Path, args: &[&str]) -> (Option<i32>, Value) {
    leakscope_testutil::ensure_shim(Path::new(BIN));
    let out_path = std::env::temp_dir().join(format!(
        "leakscope-durable-{}-{}.json",
        std::process::id(),
        args.join("-")
    ));
    let out = Command::new(BIN)
        .args(["run", "--backend", "preload", "--track", "heap"])
        .args(["--format", "json", "-o"])
        .arg(&out_path)
        .arg("--")
        .arg(cmd)
        .args(args)
        .output()
        .expect("run leakscope");
    let text = std::fs::read_to_string(&out_path).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&out_path);
    let how = out.status.code().or(out.status.signal().map(|s| 1000 + s));
    (how, serde_json::from_str(&text).expect("JSON"))
}

/// Blocks leaked by each of `names`, by the function in their stack.
fn leaked(r: &Value, names: &[&'static str]) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for g in r["leaks"].as_array().unwrap() {
        let stack = g["stack"].as_array().unwrap();
        for &name in names {
            if stack.iter().any(|f| f["function"] == name) {
                *counts.entry(name).or_insert(0) += g["count"].as_u64().unwrap();
            }
        }
    }
    counts
}

/// fixtures/heap/abrupt.c: 11 blocks from `leak_here` (and 5 from
/// `thread_leak` on a thread still blocked), then the end, six ways. The
/// records are still in the shim (no flush since) in every case.
#[test]
fn nothing_allocated_is_lost_however_the_process_ends() {
    let bin = heap_fixture("abrupt");
    // (how, leakscope's exit as it passes the command's on: core-dumping
    // signals as 128+N, others by the signal itself)
    let ends = [
        ("return", 0),
        ("_exit", 0),
        ("abort", 128 + 6),
        ("kill", 1000 + 9),
        ("segv", 128 + 11),
    ];
    for (how, status) in ends {
        for threads in [false, true] {
            let mut args = vec![how];
            let mut want = BTreeMap::from([("leak_here", 11)]);
            if threads {
                args.push("threads");
                want.insert("thread_leak", 5);
            }
            let (code, r) = run(&bin, &args);
            assert_eq!(code, Some(status), "{args:?}: {r:#}");
            assert_eq!(
                leaked(&r, &["leak_here", "thread_leak"]),
                want,
                "{args:?}: {r:#}"
            );
            assert_eq!(r["events"]["lost"], 0, "{args:?}: {r:#}");
            let leak_bytes: u64 = r["leaks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|g| g["stack"].to_string().contains("leak_here"))
                .map(|g| g["bytes"].as_u64().unwrap())
                .sum();
            assert_eq!(leak_bytes, 11 * 4242, "{args:?}");
        }
    }
}

/// fixtures/heap/closefds.c: 3 blocks before it closes every fd from 3 up
/// (close_range, a close loop, or dup2 of a socket of its own onto 1000 to
/// 1031), 5 after (and 13 more after a pause, with "idle"). All are seen,
/// and none of the shim's bytes reach the program's socket (it exits 3 if
/// any does).
#[test]
fn closing_every_fd_does_not_stop_heap_tracking() {
    let bin = heap_fixture("closefds");
    for how in ["close_range", "loop", "dup2"] {
        for idle in [false, true] {
            let mut args = vec![how];
            let mut after = 5;
            if idle {
                args.push("idle");
                after += 13;
            }
            let (code, r) = run(&bin, &args);
            assert_eq!(code, Some(0), "{args:?}: {r:#}");
            assert_eq!(
                leaked(&r, &["before_close", "after_close"]),
                BTreeMap::from([("before_close", 3), ("after_close", after)]),
                "{args:?}: {r:#}"
            );
            assert_eq!(r["events"]["lost"], 0, "{args:?}: {r:#}");
            assert_eq!(r["notes"], serde_json::json!([]), "{args:?}: {r:#}");
        }
    }
}
