//! End to end for `leakscope snoop`: the racing open/unlink/close fixture
//! (`fixtures/snoop/open_unlink_race.c`) traced live; exact counts per
//! process, entry before return on every thread, errno names; and the
//! usage errors, which need no privileges.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;

use leakscope_testutil::{require_root, workspace_root};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leakscope");
/// Rounds of the fixture (ITERATIONS in the C file).
const ROUNDS: usize = 97;

fn race_fixture() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = workspace_root().join("target/fixtures");
        std::fs::create_dir_all(&out).unwrap();
        let bin = out.join(format!("snoop-open_unlink_race-{}", std::process::id()));
        let src = workspace_root().join("fixtures/snoop/open_unlink_race.c");
        let st = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-std=c11", "-g", "-O2", "-Wall", "-Wextra", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(st.success(), "compiling {}", src.display());
        bin
    })
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("leakscope-snoop-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running `leakscope snoop`, attached (its banner was printed).
struct Snoop {
    child: Child,
    stderr: BufReader<ChildStderr>,
    banner: String,
    stdout: JoinHandle<String>,
}

fn start_snoop(args: &[&str]) -> Snoop {
    let mut child = Command::new(BIN)
        .arg("snoop")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run leakscope snoop");
    let mut out = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).expect("read snoop stdout");
        s
    });
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    // The banner is printed once the programs are attached.
    let mut banner = String::new();
    stderr.read_line(&mut banner).expect("read snoop stderr");
    assert!(
        banner.starts_with("Tracing "),
        "snoop did not start: {banner:?} (status {:?})",
        child.try_wait()
    );
    Snoop {
        child,
        stderr,
        banner,
        stdout,
    }
}

/// SIGINTs snoop and returns (stdout, stderr after the banner).
fn stop_snoop(mut s: Snoop) -> (String, String) {
    // Let the last records reach the ring buffer reader.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGINT) };
    let mut rest = String::new();
    s.stderr.read_to_string(&mut rest).unwrap();
    let status = s.child.wait().unwrap();
    let stdout = s.stdout.join().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "snoop after SIGINT: {status:?}\n{}{rest}",
        s.banner
    );
    (stdout, rest)
}

fn parse_json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// "<pid> enoent <n>" lines of the fixture -> pid -> n.
fn enoent_per_pid(fixture_stdout: &str) -> BTreeMap<u64, usize> {
    fixture_stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let pid = w.next()?.parse().ok()?;
            (w.next()? == "enoent").then_some(())?;
            Some((pid, w.next()?.parse().ok()?))
        })
        .collect()
}

fn assert_no_loss(events: &[Value], stderr: &str) {
    assert!(
        events.iter().all(|e| e.get("lost").is_none()),
        "events were lost: {stderr}"
    );
    assert!(stderr.contains(" 0 lost"), "summary: {stderr:?}");
}

#[test]
fn root_snoop_open_unlink_race() {
    if !require_root("root_snoop_open_unlink_race") {
        return;
    }
    let fixture = race_fixture();
    let dir = temp_dir("race");
    let comm = format!("lsrace{}", std::process::id() % 1_000_000);
    let snoop = start_snoop(&[
        "-n",
        &comm,
        "--syscalls",
        "open,close,unlink",
        "--entry",
        "--format",
        "json",
    ]);
    let out = Command::new(fixture)
        .arg(&dir)
        .arg(&comm)
        .output()
        .expect("run fixture");
    assert!(out.status.success(), "fixture: {out:?}");
    let (stdout, stderr) = stop_snoop(snoop);
    let _ = std::fs::remove_dir_all(&dir);
    let enoent = enoent_per_pid(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(enoent.len(), 2, "fixture output: {out:?}");
    assert_eq!(enoent.values().sum::<usize>(), ROUNDS);

    let events = parse_json_lines(&stdout);
    assert_no_loss(&events, &stderr);
    // Exact counts: (pid, syscall, phase) -> n.
    let mut counts: BTreeMap<(u64, String, String), usize> = BTreeMap::new();
    for e in &events {
        assert_eq!(e["comm"], comm.as_str(), "{e}");
        *counts
            .entry((
                e["pid"].as_u64().unwrap(),
                e["syscall"].as_str().unwrap().to_string(),
                e["phase"].as_str().unwrap().to_string(),
            ))
            .or_default() += 1;
    }
    let mut want = BTreeMap::new();
    for &pid in enoent.keys() {
        for sc in ["open", "unlink", "close"] {
            for phase in ["entry", "return"] {
                want.insert((pid, sc.to_string(), phase.to_string()), ROUNDS);
            }
        }
    }
    assert_eq!(counts, want, "stderr: {stderr}");

    // Per thread: every entry is followed by the return of the same
    // syscall, and timestamps never go back.
    let mut per_tid: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for e in &events {
        per_tid
            .entry(e["tid"].as_u64().unwrap())
            .or_default()
            .push(e);
    }
    for (tid, evs) in &per_tid {
        for pair in evs.chunks(2) {
            let [entry, ret] = pair else {
                panic!("tid {tid}: odd number of events")
            };
            assert_eq!(entry["phase"], "entry", "tid {tid}: {entry}");
            assert_eq!(ret["phase"], "return", "tid {tid}: {ret}");
            assert_eq!(entry["syscall"], ret["syscall"]);
            assert!(entry["ts_ns"].as_u64() <= ret["ts_ns"].as_u64());
            assert!(entry["ret"].is_null() && entry["lat_us"].is_null());
            assert!(ret["lat_us"].as_f64().unwrap() >= 0.0);
        }
        for w in evs.windows(2) {
            assert!(
                w[0]["ts_ns"].as_u64() <= w[1]["ts_ns"].as_u64(),
                "tid {tid}"
            );
        }
    }

    // Results and decoding: every open succeeds with O_CREAT, the unlinks
    // that lost the race say ENOENT, each process's count as it saw it.
    let path = dir.join("race.sample");
    for e in events.iter().filter(|e| e["phase"] == "return") {
        match e["syscall"].as_str().unwrap() {
            "open" => {
                assert!(e["ret"].as_i64().unwrap() >= 3, "{e}");
                assert_eq!(e["args"]["path"], path.to_str().unwrap());
                assert_eq!(e["args"]["flags"], "O_RDWR|O_CREAT|O_CLOEXEC");
                assert_eq!(e["args"]["mode"], "0600");
            }
            "unlink" => {
                assert_eq!(e["args"]["path"], path.to_str().unwrap());
                match e["ret"].as_i64().unwrap() {
                    0 => assert!(e["errno"].is_null()),
                    -1 => assert_eq!(e["errno"], "ENOENT", "{e}"),
                    r => panic!("unlink returned {r}"),
                }
            }
            "close" => assert_eq!(e["ret"], 0, "{e}"),
            other => panic!("unexpected syscall {other}"),
        }
    }
    for (&pid, &n) in &enoent {
        let failed = events
            .iter()
            .filter(|e| e["pid"] == pid && e["syscall"] == "unlink" && e["errno"] == "ENOENT")
            .count();
        assert_eq!(failed, n, "pid {pid}: ENOENT unlinks");
    }
}

/// `-p PID --failed`: only that process (not its fork), only errors.
#[test]
fn root_snoop_pid_failed_only() {
    if !require_root("root_snoop_pid_failed_only") {
        return;
    }
    let fixture = race_fixture();
    let dir = temp_dir("pid");
    let mut race = Command::new(fixture)
        .arg(&dir)
        .arg("lsracepid")
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run fixture");
    let mut race_out = BufReader::new(race.stdout.take().unwrap());
    let mut ready = String::new();
    race_out.read_line(&mut ready).unwrap();
    let pid: u64 = ready
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("fixture said {ready:?}"));
    let snoop = start_snoop(&["-p", &pid.to_string(), "--failed", "--format", "json"]);
    race.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    race_out.read_to_string(&mut rest).unwrap();
    assert!(race.wait().unwrap().success());
    let (stdout, stderr) = stop_snoop(snoop);
    let _ = std::fs::remove_dir_all(&dir);
    let enoent = enoent_per_pid(&rest);
    let events = parse_json_lines(&stdout);
    assert_no_loss(&events, &stderr);
    assert!(
        events
            .iter()
            .all(|e| e["pid"] == pid && e["phase"] == "return" && e["ret"] == -1),
        "{stdout}"
    );
    let unlink_enoent = events
        .iter()
        .filter(|e| e["syscall"] == "unlink" && e["errno"] == "ENOENT")
        .count();
    assert_eq!(unlink_enoent, enoent[&pid], "{stdout}");
}

/// Text output: a header, aligned columns, entries marked with `>`.
#[test]
fn root_snoop_text_columns() {
    if !require_root("root_snoop_text_columns") {
        return;
    }
    let fixture = race_fixture();
    let dir = temp_dir("text");
    let comm = format!("lstext{}", std::process::id() % 1_000_000);
    let snoop = start_snoop(&["-n", &comm, "--syscalls", "unlink", "--entry"]);
    let out = Command::new(fixture).arg(&dir).arg(&comm).output().unwrap();
    assert!(out.status.success());
    let (stdout, _) = stop_snoop(snoop);
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("TIME "), "{stdout}");
    let col = |name: &str| lines[0].find(name).unwrap();
    assert_eq!(lines.len(), 1 + 4 * ROUNDS, "{stdout}");
    let enoent = lines.iter().filter(|l| l.contains(" ENOENT ")).count();
    assert_eq!(enoent, ROUNDS);
    for l in &lines[1..] {
        let sc = &l[col("SYSCALL")..];
        assert!(
            sc.starts_with(">unlink ") || sc.starts_with("unlink "),
            "{l}"
        );
        assert!(l[col("COMM")..].starts_with(&comm), "{l}");
        assert!(
            l.ends_with(&format!("{:?}", dir.join("race.sample"))),
            "{l}"
        );
    }
}

#[test]
fn snoop_unknown_syscall_is_a_one_line_error() {
    let out = Command::new(BIN)
        .args(["snoop", "--syscalls", "open,bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown syscall `bogus`"), "{err}");
    assert!(err.contains("open,openat,openat2,creat,close"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn snoop_missing_pid_is_a_one_line_error() {
    let out = Command::new(BIN)
        .args(["snoop", "-p", "2147483647"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "leakscope: error: no process with pid 2147483647"
    );
}

/// `-n` matching nothing: one note after 3 s, then it keeps waiting until
/// --duration; exit 0 with a summary.
#[test]
fn root_snoop_name_matching_nothing_notes_once() {
    if !require_root("root_snoop_name_matching_nothing_notes_once") {
        return;
    }
    let out = Command::new(BIN)
        .args(["snoop", "-n", "no-such-comm", "--duration", "3.5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let notes = err
        .lines()
        .filter(|l| l.contains("no process named no-such-comm has made a traced syscall yet"))
        .count();
    assert_eq!(notes, 1, "{err}");
    assert!(
        err.lines().last().unwrap().contains("0 events, 0 lost"),
        "{err}"
    );
}
