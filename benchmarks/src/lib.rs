//! What the peers share: arguments and the length-prefixed (u32
//! little-endian) frame scan. Each peer echoes every complete frame.

/// `--listen ADDR --threads N` from the command line.
pub fn args() -> (std::net::SocketAddr, usize) {
    let mut listen: std::net::SocketAddr = ([127, 0, 0, 1], 7878).into();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--listen" => {
                listen = value
                    .parse()
                    .unwrap_or_else(|e| die(&format!("--listen: {e}")))
            }
            "--threads" => {
                threads = value
                    .parse()
                    .unwrap_or_else(|e| die(&format!("--threads: {e}")))
            }
            other => die(&format!("unknown flag {other}")),
        }
    }
    (listen, threads.max(1))
}

fn die(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2)
}

/// The length of the complete frames at the start of `buf` (header
/// included), and the total size of the first incomplete one, if its header
/// is there.
pub fn complete_frames(buf: &[u8]) -> (usize, Option<usize>) {
    let mut at = 0;
    while buf.len() - at >= 4 {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if buf.len() - at - 4 < len {
            return (at, Some(4 + len));
        }
        at += 4 + len;
    }
    (at, None)
}
