//! End to end: what leakscope's exit status and the report's verdicts
//! promise (issue 10). leakscope's own failure is 125, never a code the
//! command could have returned; a command that failed keeps its status
//! under `--fail-on-leak`; a death by a signal is named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use leakscope_testutil::{heap_fixture, require_root, workspace_root};
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
    let first = err.lines().next().unwrap();
    assert!(
        first.starts_with("leakscope: `sh -c ulimit")
            && first.ends_with("` killed by SIGABRT; traced heap (preload)"),
        "{err}"
    );
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

/// [`as_nobody`], under `fixtures/ptrace/no_ptrace.c`: a seccomp policy
/// that denies ptrace(2), as container runtimes' default profiles do.
fn as_nobody_without_ptrace(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let wrapper = dir.join("no_ptrace");
    if !wrapper.exists() {
        let st = Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&wrapper)
            .arg(workspace_root().join("fixtures/ptrace/no_ptrace.c"))
            .status()
            .expect("cc");
        assert!(st.success());
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&wrapper)
        .arg(dir.join("leakscope"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("setpriv (util-linux)")
}

/// The backends `doctor --format json` says work, by name.
fn working(out: &Output) -> Vec<String> {
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no JSON ({e}): {:?} {}", out.status, stderr(out));
    });
    r["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["works"] == true)
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

/// `doctor` answers with 1 when no backend works (its verdict), keeping
/// 125 for its own failure; 0 when one does. As nobody eBPF is refused;
/// with the shim pointed at nothing, ptrace alone works (unless Yama
/// forbids it to nobody), and under a seccomp policy that denies ptrace
/// nothing does.
#[test]
fn root_doctor_without_a_working_backend_exits_1() {
    if !require_root("root_doctor_without_a_working_backend_exits_1") {
        return;
    }
    let dir = temp_dir("doctor");
    let no_shim = [(
        leakscope_preload::SHIM_ENV,
        "/nonexistent/libleakscope_shim.so",
    )];
    let args = ["doctor", "--format", "json"];
    let out = as_nobody(&dir, &args, &no_shim);
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if scope.is_some_and(|s| s >= 2) {
        // Yama leaves ptrace to CAP_SYS_PTRACE (2) or to no one (3).
        assert!(working(&out).is_empty(), "{}", stderr(&out));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    } else {
        assert_eq!(working(&out), ["ptrace"], "{}", stderr(&out));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }

    let out = as_nobody_without_ptrace(&dir, &args, &no_shim);
    assert!(working(&out).is_empty(), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ptrace = r["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "ptrace")
        .expect("a ptrace row");
    let why = ptrace["reason"].as_str().unwrap_or_default();
    assert!(why.contains("seccomp policy"), "{why}");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    let out = as_nobody_without_ptrace(&dir, &args, &[]);
    assert_eq!(
        working(&out),
        ["preload"],
        "the shim works: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
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

/// The report's text with each wrapped line joined to the one it
/// continues: a reason under the first line continues with 4 spaces, the
/// verdict ("No ... found", "Nothing was traced") with 2.
fn unwrapped(text: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut in_verdict = false;
    for line in text.lines() {
        let more = line.strip_prefix("    ").or_else(|| {
            line.strip_prefix("  ")
                .filter(|l| in_verdict && !l.starts_with(' '))
        });
        match (more, out.last_mut()) {
            (Some(rest), Some(last)) => {
                last.push(' ');
                last.push_str(rest);
            }
            _ => {
                in_verdict = line.starts_with("No ") || line.starts_with("Nothing was traced");
                out.push(line.to_string());
            }
        }
    }
    out.join("\n") + "\n"
}

fn json_report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("JSON")
}

/// The `coverage` entry of `kind`.
fn coverage<'a>(r: &'a Value, kind: &str) -> &'a Value {
    r["coverage"]
        .as_array()
        .expect("coverage")
        .iter()
        .find(|c| c["kind"] == kind)
        .unwrap_or_else(|| panic!("no coverage of {kind}: {r}"))
}

/// A statically linked program ignores LD_PRELOAD: under the heap shim
/// nothing is traced, and the report says so first instead of "No leaks
/// found"; `--fail-on-leak` exits 4, not 0. No privileges needed.
#[test]
fn a_static_program_under_the_heap_shim_is_not_called_clean() {
    let dir = temp_dir("static");
    std::fs::copy(
        leakscope_testutil::fixture("static_leak"),
        dir.join("static_leak"),
    )
    .unwrap();
    let json = dir.join("r.json");
    let run = |extra: &[&str]| -> Output {
        leakscope_testutil::ensure_shim(Path::new(BIN));
        Command::new(BIN)
            .args(["run", "--fail-on-leak"])
            .args(HEAP)
            .args(extra)
            .args(["--", "./static_leak"])
            .current_dir(&dir)
            .output()
            .expect("run leakscope")
    };
    let out = run(&[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let pid = err
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no pid: {err}"));
    let why = format!("`./static_leak` (pid {pid}) is statically linked and ignores LD_PRELOAD");
    // The summary's event count and time vary; the rest is exact.
    let text = unwrapped(&err);
    let (text, summary) = text.trim_end().rsplit_once('\n').unwrap();
    assert_eq!(
        text,
        format!(
            "leakscope: `./static_leak` exited with 0; traced NOTHING, NOT the heap\n  \
             the heap was not traced: {why}\n\
             \n\
             Nothing was traced, so no leaks can be reported; the heap was not traced: {why}.\n"
        )
    );
    assert!(
        summary.starts_with("Summary: nothing traced (the heap was not traced); "),
        "{summary}"
    );

    let out = run(&["--format", "json", "-o", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let r = json_report(&json);
    let heap = coverage(&r, "heap");
    assert_eq!(heap["requested"], true);
    assert_eq!(heap["traced"], "none");
    assert!(
        heap["reason"]
            .as_str()
            .unwrap()
            .ends_with("is statically linked and ignores LD_PRELOAD"),
        "{heap}"
    );
    // fds were not asked for (--backend preload): no part of the verdict.
    assert_eq!(coverage(&r, "fd")["requested"], false);
    assert_eq!(coverage(&r, "fd")["traced"], "none");
    assert_eq!(r["leaks"].as_array().unwrap().len(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without eBPF (leakscope runs as nobody) a plain run traces fds with
/// ptrace and the heap with the shim (issue 13; before, fds were left
/// out): the first line says so, and `--fail-on-leak` exits 3 on a
/// program that leaks 3 fds and no heap block. `--track heap` asks for the
/// heap alone: then 0.
#[test]
fn root_without_ebpf_fail_on_leak_does_not_pass_untraced_fds() {
    if !require_root("root_without_ebpf_fail_on_leak_does_not_pass_untraced_fds") {
        return;
    }
    let dir = temp_dir("noebpf");
    let prog = dir.join("short_lived");
    std::fs::copy(leakscope_testutil::fixture("short_lived"), &prog).unwrap();
    let prog = prog.to_str().unwrap();
    let out = as_nobody(&dir, &["run", "--fail-on-leak", "--", prog], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let text = unwrapped(&err);
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("leakscope: `")
            && first.ends_with("` exited with 0; traced fds and heap (ptrace+preload)"),
        "{err}"
    );
    assert!(text.contains("3 file fds leaked from quick_leak"), "{err}");
    // The heap alone, asked for by name: what was asked was traced.
    let out = as_nobody(
        &dir,
        &["run", "--fail-on-leak", "--track", "heap", "--", prog],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("\nNo leaks found.\n"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With eBPF, a static program's fds are traced and its heap is not: the
/// first line says so (naming only the backend that saw something), and
/// its 12 fd leaks are a verdict (3).
#[test]
fn root_a_static_program_has_its_fds_traced_and_not_its_heap() {
    if !require_root("root_a_static_program_has_its_fds_traced_and_not_its_heap") {
        return;
    }
    let dir = temp_dir("static-ebpf");
    std::fs::copy(
        leakscope_testutil::fixture("static_leak"),
        dir.join("static"),
    )
    .unwrap();
    leakscope_testutil::ensure_shim(Path::new(BIN));
    let out = Command::new(BIN)
        .args(["run", "--fail-on-leak", "--", "./static"])
        .current_dir(&dir)
        .output()
        .expect("run leakscope");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let text = unwrapped(&err);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("leakscope: `./static` exited with 0; traced fds and TCP states (ebpf), NOT the heap")
    );
    let why = lines.next().unwrap();
    assert!(
        why.starts_with("  the heap was not traced: `./static` (pid ")
            && why.ends_with(") is statically linked and ignores LD_PRELOAD"),
        "{err}"
    );
    assert!(
        err.lines()
            .last()
            .unwrap()
            .starts_with("Summary: 12 fds in 2 groups leaked (the heap was not traced); "),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Compiles C `source` as `dir/name` with `flags`.
fn cc(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let bin = dir.join(name);
    let st = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(st.success(), "compiling {name}");
    bin
}

/// A program that starts a statically linked one (as Debian's `ldconfig`
/// wrapper did): the heap is traced in the first and not in the second.
/// The report says part of the heap was not traced, and which program;
/// with no leak found, `--fail-on-leak` exits 4. Seen through eBPF's exec
/// events, so root.
#[test]
fn root_a_static_child_leaves_part_of_the_heap_untraced() {
    if !require_root("root_a_static_child_leaves_part_of_the_heap_untraced") {
        return;
    }
    let dir = temp_dir("static-child");
    cc(
        &dir,
        "launch",
        "#include <sys/wait.h>\n#include <unistd.h>\n\
         int main(int argc, char **argv) {\n\
           (void)argc;\n\
           pid_t p = fork();\n\
           if (p == 0) { execv(argv[1], argv + 1); _exit(127); }\n\
           int st;\n\
           waitpid(p, &st, 0);\n\
           return WIFEXITED(st) ? WEXITSTATUS(st) : 1;\n\
         }\n",
        &["-O2"],
    );
    let noop = cc(&dir, "noop", "int main(void) { return 0; }\n", &["-static"]);
    let noop = std::fs::canonicalize(noop).unwrap();
    let json = dir.join("r.json");
    leakscope_testutil::ensure_shim(Path::new(BIN));
    let run = |extra: &[&str]| -> Output {
        Command::new(BIN)
            .args(["run", "--fail-on-leak"])
            .args(extra)
            .args(["--", "./launch"])
            .arg(&noop)
            .current_dir(&dir)
            .output()
            .expect("run leakscope")
    };
    let out = run(&[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let text = unwrapped(&err);
    let mut lines = text.lines();
    let first = lines.next().unwrap();
    assert!(
        first.starts_with("leakscope: `./launch")
            && first.ends_with(
                "` exited with 0; traced fds, heap and TCP states (ebpf+preload), NOT all of \
                 the heap"
            ),
        "{err}"
    );
    let why = lines.next().unwrap();
    let want = format!(
        "  part of the heap was not traced: `{}` (pid ",
        noop.display()
    );
    assert!(
        why.starts_with(&want) && why.ends_with(") is statically linked and ignores LD_PRELOAD"),
        "{err}"
    );
    assert!(
        text.contains(&format!(
            "\nNo fd, heap or TCP leaks found; {}.\n",
            why.trim_start()
        )),
        "{err}"
    );
    let out = run(&["--format", "json", "-o", json.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let r = json_report(&json);
    assert_eq!(coverage(&r, "fd")["traced"], "all");
    let heap = coverage(&r, "heap");
    assert_eq!(
        (&heap["requested"], &heap["traced"]),
        (&Value::from(true), &Value::from("part"))
    );
    assert!(
        heap["reason"]
            .as_str()
            .unwrap()
            .starts_with(&format!("`{}` (pid ", noop.display())),
        "{heap}"
    );
    // With eBPF, the defaults include TCP states.
    assert_eq!(coverage(&r, "tcp")["requested"], true);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid of the process a "still running" note or the waiting notice
/// names first, killed so that nothing outlives the test.
fn kill_named(text: &str) -> u32 {
    let at = text.find("(pid ").expect("a pid") + 5;
    let pid: u32 = text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: a signal to a process the test's command started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    pid
}

/// A command that exits leaving a daemon behind: `--wait main` reports at
/// once, and names the daemon as still running; without it leakscope says
/// on stderr whom it waits for, and Ctrl-C stops the wait and reports.
#[test]
fn a_command_that_leaves_a_process_running() {
    let dir = temp_dir("daemon");
    let json = dir.join("r.json");
    let daemon = ["--", "sh", "-c", "sleep 300 & exit 0"];
    let mut args = vec!["run", "--wait", "main", "--format", "json", "-o"];
    args.push(json.to_str().unwrap());
    args.extend(HEAP);
    args.extend(daemon);
    // Not output(): the daemon holds stdout and stderr open.
    leakscope_testutil::ensure_shim(Path::new(BIN));
    let status = Command::new(BIN)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let notes = json_report(&json)["notes"].to_string();
    assert!(
        notes.contains("still running when tracing stopped: pid "),
        "{notes}"
    );
    assert!(
        notes.contains(" (sleep); what they hold is listed as outstanding"),
        "{notes}"
    );
    kill_named(&notes.replace("pid ", "(pid "));

    // Without --wait main: the notice, then Ctrl-C.
    use std::io::{BufRead, BufReader};
    let mut args = vec!["run", "--format", "json", "-o"];
    args.push(json.to_str().unwrap());
    args.extend(HEAP);
    args.extend(daemon);
    let mut ls = Command::new(BIN)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(ls.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("waiting for") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "no waiting notice");
    }
    assert!(
        line.starts_with(
            "leakscope: `sh` exited; waiting for 1 process it started that still runs (pid "
        ) && line.contains(" (sleep)): Ctrl-C stops waiting"),
        "{line}"
    );
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(ls.id() as i32, libc::SIGINT) };
    assert_eq!(ls.wait().unwrap().code(), Some(0));
    let notes = json_report(&json)["notes"].to_string();
    assert!(
        notes.contains("still running when tracing stopped"),
        "{notes}"
    );
    kill_named(&line);
    let _ = std::fs::remove_dir_all(&dir);
}
