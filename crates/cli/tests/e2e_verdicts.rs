//! End to end: what leakscope's exit status and the report's verdicts
//! promise (issue 10). leakscope's own failure is 125, never a code the
//! command could have returned; a command that failed keeps its status
//! under `--fail-on-leak`; a death by a signal is named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use leakscope_testutil::{require_root, workspace_root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");

fn leakscope(args: &[&str]) -> Output {
    leakscope_testutil::ensure_shim(Path::new(BIN));
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run leakscope")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A fresh directory for one test.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("leakscope-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `fixtures/heap/NAME.c`, compiled once per test process.
fn heap_fixture(name: &str) -> PathBuf {
    let out = workspace_root().join("target/fixtures");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(format!("verdicts-{name}-{}", std::process::id()));
    if !bin.exists() {
        let tmp = bin.with_extension("tmp");
        let src = workspace_root().join(format!("fixtures/heap/{name}.c"));
        let st = Command::new("cc")
            .args(["-g", "-O2", "-pthread", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(st.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &bin).unwrap();
    }
    bin
}

const HEAP: [&str; 4] = ["--backend", "preload", "--track", "heap"];

/// Bad usage is leakscope's own failure: 125, as env(1) and timeout(1)
/// exit for theirs, so that it is never read as the command's 1 or 2.
/// Asking for help is not a failure.
#[test]
fn usage_errors_exit_125() {
    for args in [
        &["run"][..],
        &["run", "--bogus", "--", "true"],
        &["run", "--track", "disk", "--", "true"],
        &["frobnicate"],
        &["attach"],
    ] {
        let out = leakscope(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
    for args in [&["--help"][..], &["run", "--help"], &["--version"]] {
        let out = leakscope(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
}

/// `--fail-on-leak` turns leaks into 3 only when the command itself
/// succeeded: a command that failed keeps its own exit status, so a CI
/// gate never hides a crash or a failed test behind "leaks found".
#[test]
fn fail_on_leak_keeps_the_commands_failure() {
    let leaky = heap_fixture("nested");
    let leaky = leaky.to_str().unwrap();
    let gate = |script: &str| -> Output {
        let mut args = vec!["run", "--fail-on-leak"];
        args.extend(HEAP);
        args.extend(["--", "sh", "-c", script]);
        leakscope(&args)
    };
    // 13 leaks, exit 0: the gate.
    let out = gate(leaky);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // 13 leaks, exit 5: the command's failure comes first.
    let out = gate(&format!("{leaky}; exit 5"));
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("13 heap blocks (832 bytes) leaked from parse_line"));
    // No leaks: the command's own status, 0 or not.
    let out = leakscope(&[&["run", "--fail-on-leak"][..], &HEAP, &["--", "true"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = leakscope(&[&["run", "--fail-on-leak"][..], &HEAP, &["--", "false"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

/// A command killed by a signal is said to be, by the signal's name; the
/// exit status stays 128+N (SIGABRT dumps core, so leakscope does not
/// re-raise it), and JSON names the signal next to `exit_code`.
#[test]
fn a_death_by_a_signal_is_named() {
    let script = "ulimit -c 0; kill -ABRT $$";
    let out = leakscope(&[&["run"][..], &HEAP, &["--", "sh", "-c", script]].concat());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(128 + libc::SIGABRT), "{err}");
    let killed = format!("`sh -c {script}` killed by SIGABRT");
    assert!(err.contains(&killed), "{err}");
    assert!(!err.contains("exited with"), "{err}");

    let dir = temp_dir("signal");
    let json = dir.join("r.json");
    let out = leakscope(
        &[
            &["run", "--format", "json", "-o", json.to_str().unwrap()][..],
            &HEAP,
            &["--", "sh", "-c", script],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(134), "{}", stderr(&out));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["target"]["exit_code"], 134);
    assert_eq!(r["target"]["signal"], "SIGABRT");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a copy of leakscope (and the shim) in `dir` as nobody, where no
/// eBPF program may be loaded; `env` adds variables. The first call copies
/// them and makes `dir` and all in it everyone's.
fn as_nobody(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    if !dir.join("leakscope").exists() {
        leakscope_testutil::ensure_shim(Path::new(BIN));
        let bin_dir = Path::new(BIN).parent().unwrap();
        for f in ["leakscope", leakscope_preload::SHIM_NAME] {
            std::fs::copy(bin_dir.join(f), dir.join(f)).unwrap();
        }
        let chmod = Command::new("chmod")
            .arg("-R")
            .arg("a+rwx")
            .arg(dir)
            .status()
            .unwrap();
        assert!(chmod.success());
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(dir.join("leakscope"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("setpriv (util-linux)")
}

/// `doctor` answers with 1 when no backend works (its verdict), keeping
/// 125 for its own failure; 0 when one does.
#[test]
fn root_doctor_without_a_working_backend_exits_1() {
    if !require_root("root_doctor_without_a_working_backend_exits_1") {
        return;
    }
    let dir = temp_dir("doctor");
    let out = as_nobody(
        &dir,
        &["doctor", "--format", "json"],
        &[(
            leakscope_preload::SHIM_ENV,
            "/nonexistent/libleakscope_shim.so",
        )],
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no JSON ({e}): {:?} {}", out.status, stderr(&out));
    });
    let works: Vec<&Value> = r["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["works"] == true)
        .collect();
    assert!(works.is_empty(), "{works:#?}");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = as_nobody(&dir, &["doctor", "--format", "json"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the shim works: {}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `-o` to a path that cannot be written fails at once, in one line and
/// with 125, before the command runs: a missing directory, a directory,
/// a path through a file. `run` and `attach` alike.
#[test]
fn an_unwritable_output_fails_before_the_command_runs() {
    let dir = temp_dir("output");
    let marker = dir.join("ran");
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    let cases = [
        (
            "/nonexistent/dir/r.json".to_string(),
            "no such directory: /nonexistent/dir",
        ),
        (dir.display().to_string(), "it is a directory"),
        (
            format!("{}/r.json", file.display()),
            "a part of the path is not a directory",
        ),
    ];
    for (path, why) in &cases {
        let out = leakscope(&[
            "run",
            "--track",
            "heap",
            "-o",
            path,
            "--",
            "touch",
            marker.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(125), "{path}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!("leakscope: error: cannot write the report to {path}: {why}\n")
        );
        assert!(!marker.exists(), "{path}: the command ran");
    }
    // attach checks before it attaches (no privileges needed to fail).
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let out = leakscope(&["attach", "-p", &pid, "-o", &cases[0].0]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "leakscope: error: cannot write the report to {}: {}\n",
            cases[0].0, cases[0].1
        )
    );
    // A path that can be written is left as it was found.
    let fresh = dir.join("fresh.json");
    let out = leakscope(&[
        "run",
        "--track",
        "heap",
        "-o",
        fresh.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&fresh)
        .unwrap()
        .contains("Summary:"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A read-only place (a directory or a file the user may not write):
/// 125 before the command runs. As nobody, since root writes anywhere.
#[test]
fn root_a_read_only_output_fails_before_the_command_runs() {
    if !require_root("root_a_read_only_output_fails_before_the_command_runs") {
        return;
    }
    let dir = temp_dir("readonly");
    let marker = dir.join("ran");
    let locked = dir.join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    let report = dir.join("report.json");
    std::fs::write(&report, "old").unwrap();
    let _ = as_nobody(&dir, &["--version"], &[]);
    for (p, mode) in [(&locked, "0555"), (&report, "0444")] {
        let st = Command::new("chmod").arg(mode).arg(p).status().unwrap();
        assert!(st.success());
    }
    for path in [locked.join("r.json"), report.clone()] {
        let path = path.to_str().unwrap();
        let out = as_nobody(
            &dir,
            &[
                "run",
                "--backend",
                "preload",
                "--track",
                "heap",
                "-o",
                path,
                "--",
                "touch",
                marker.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(125), "{path}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!("leakscope: error: cannot write the report to {path}: permission denied\n")
        );
        assert!(!marker.exists(), "{path}: the command ran");
    }
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "old");
    let _ = std::fs::remove_dir_all(&dir);
}
