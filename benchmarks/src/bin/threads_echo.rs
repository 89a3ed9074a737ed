//! Echo with a thread per connection (std, blocking): the baseline.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..])?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let (done, need) = eserver_peers::complete_frames(&buf[..filled]);
        if done > 0 {
            stream.write_all(&buf[..done])?;
        }
        buf.copy_within(done..filled, 0);
        filled -= done;
        if let Some(need) = need
            && need > buf.len()
        {
            buf.resize(need, 0);
        }
    }
}

fn main() -> std::io::Result<()> {
    let (addr, _) = eserver_peers::args();
    let listener = TcpListener::bind(addr)?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                let _ = serve(stream);
            })?;
    }
    Ok(())
}
