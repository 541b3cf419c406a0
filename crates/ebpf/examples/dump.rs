//! Prints the raw event stream of a traced command (a debugging aid).
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut tracer = leakscope_ebpf::Tracer::new(Default::default()).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    let mut child = tracer
        .spawn(std::process::Command::new(&args[0]).args(&args[1..]))
        .expect("spawn");
    let mut live = 1i64;
    while live > 0 {
        tracer
            .poll(Duration::from_millis(100), &mut |e| {
                match &e {
                    leakscope_event::Event::Fork {
                        shares_table: false,
                        ..
                    } => live += 1,
                    leakscope_event::Event::Exit { .. } => live -= 1,
                    _ => {}
                }
                println!("{e:?}");
            })
            .unwrap();
    }
    let _ = child.wait();
}
