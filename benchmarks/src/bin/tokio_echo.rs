//! Echo with tokio: a multi-thread runtime with the same worker count, a
//! task per connection, reads into a buffer, and writes the echo of every
//! complete frame a read brought with one `write_all`, straight from the
//! read buffer.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut filled = 0;
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
        // The complete frames' echo, straight from the read buffer.
        if done > 0 {
            stream.write_all(&buf[..done]).await?;
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
    let (addr, threads) = eserver_peers::args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_io()
        .enable_time()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(stream).await;
                    });
                }
                // A failed accept (EMFILE, a connection aborted in the
                // backlog) ends no server: back off a little and go on.
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    })
}
