//! Echo with tokio: a multi-thread runtime with the same worker count, a
//! task per connection, reads into a buffer, every complete frame's echo
//! collected and written with one `write_all` when the read side drains.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut filled = 0;
    let mut out = Vec::with_capacity(16 << 10);
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let (done, need) = eserver_peers::complete_frames(&buf[..filled]);
        out.extend_from_slice(&buf[..done]);
        buf.copy_within(done..filled, 0);
        filled -= done;
        if let Some(need) = need
            && need > buf.len()
        {
            buf.resize(need, 0);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
}

fn main() -> std::io::Result<()> {
    let (addr, threads) = eserver_peers::args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = serve(stream).await;
            });
        }
    })
}
