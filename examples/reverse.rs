//! A custom application on eserver: replies to each frame with its payload
//! reversed, and keeps a per-connection message count (owned by the
//! connection's read side, so it needs no lock).
//!
//! ```text
//! cargo run --example reverse            # serves on 127.0.0.1:7979
//! cargo run --example reverse -- --demo  # serves, talks to itself, exits
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use eserver::{CloseInfo, Config, Ctx, Handler, Server};

struct Reverse;

impl Handler for Reverse {
    /// Messages seen on this connection.
    type Conn = u64;

    fn on_open(&self, ctx: &mut Ctx<'_>) -> u64 {
        println!("{} opened from {:?}", ctx.id(), ctx.peer_addr());
        0
    }

    fn on_message(&self, count: &mut u64, ctx: &mut Ctx<'_>, msg: &[u8]) {
        *count += 1;
        let reversed: Vec<u8> = msg.iter().rev().copied().collect();
        if ctx.reply(&reversed).is_err() {
            ctx.close();
        }
    }

    fn on_close(&self, count: u64, info: CloseInfo<'_>) {
        println!(
            "{} closed ({}) after {count} message(s)",
            info.id, info.reason
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let demo = std::env::args().any(|a| a == "--demo");
    let addr: SocketAddr = if demo {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:7979"
    }
    .parse()?;
    let running = Server::bind(Config::default().listen(addr).threads(2), Reverse)?.start()?;
    let addr = running.local_addr().ok_or("no TCP address")?;
    println!("listening on {addr}");
    if !demo {
        // Serve until killed.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let mut client = TcpStream::connect(addr)?;
    for word in ["stressed", "drawer", "repaid"] {
        client.write_all(&(word.len() as u32).to_le_bytes())?;
        client.write_all(word.as_bytes())?;
        let mut header = [0u8; 4];
        client.read_exact(&mut header)?;
        let mut reply = vec![0u8; u32::from_le_bytes(header) as usize];
        client.read_exact(&mut reply)?;
        println!("{word} -> {}", String::from_utf8_lossy(&reply));
    }
    drop(client);
    let stats = running.stop(Duration::from_secs(5));
    println!("{stats}");
    Ok(())
}
