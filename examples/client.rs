//! Outbound connections: a client-only event loop that connects to an echo
//! server (started here too), sends a few numbered messages on each
//! connection from `on_open`, checks the echoes in `on_message`, and closes.
//!
//! ```text
//! cargo run --example client
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use eserver::apps::Echo;
use eserver::{CloseInfo, Config, ConnectFailure, Ctx, Handler, Server};

const MESSAGES: u32 = 3;

#[derive(Default)]
struct Pinger {
    done: AtomicUsize,
}

impl Handler for Pinger {
    /// The next echo expected.
    type Conn = u32;

    fn on_open(&self, ctx: &mut Ctx<'_>) -> u32 {
        for i in 0..MESSAGES {
            let _ = ctx.reply(format!("{} says {i}", ctx.id()).as_bytes());
        }
        0
    }

    fn on_message(&self, next: &mut u32, ctx: &mut Ctx<'_>, msg: &[u8]) {
        let expected = format!("{} says {next}", ctx.id());
        if msg != expected.as_bytes() {
            eprintln!("{}: unexpected echo {msg:?}", ctx.id());
            ctx.close();
            return;
        }
        *next += 1;
        if *next == MESSAGES {
            println!("{}: {MESSAGES} echoes back, in order", ctx.id());
            ctx.close();
        }
    }

    fn on_close(&self, _: u32, _: CloseInfo<'_>) {
        self.done.fetch_add(1, Ordering::Release);
    }

    fn on_connect_failed(&self, failure: ConnectFailure<'_>) {
        eprintln!(
            "{}: connect to {} failed: {}",
            failure.id, failure.addr, failure.error
        );
        self.done.fetch_add(1, Ordering::Release);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::bind(
        Config::default()
            .listen("127.0.0.1:0".parse::<std::net::SocketAddr>()?)
            .threads(2),
        Echo,
    )?
    .start()?;
    let addr = server.local_addr().ok_or("no TCP address")?;

    let pinger = Arc::new(Pinger::default());
    let client = Server::bind(
        Config::default().without_listeners().threads(1),
        Arc::clone(&pinger),
    )?
    .start()?;
    let connections = 5;
    for _ in 0..connections {
        client.handle().connect(addr)?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pinger.done.load(Ordering::Acquire) < connections && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("client: {}", client.stop(Duration::from_secs(1)));
    println!("server: {}", server.stop(Duration::from_secs(1)));
    Ok(())
}
