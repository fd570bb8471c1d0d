//! A TCP proxy that can be cut and restored: puts a real dependency (Redis, an
//! upstream) behind a port a test can take down mid-run, dropping every open
//! connection, and bring back on the same port. It also counts round trips (a client
//! sending, then the server answering), so a test can prove how many a call costs.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};

/// Forwards `addr` to `target` while up.
pub struct OutageProxy {
    addr: SocketAddr,
    target: SocketAddr,
    /// `true` while up; flipping to `false` closes the listener and every connection.
    up: watch::Sender<bool>,
    running: Mutex<Option<tokio::task::JoinHandle<()>>>,
    round_trips: Arc<AtomicU64>,
}

impl OutageProxy {
    /// Listen on a free loopback port and forward to `target`.
    pub async fn start(target: SocketAddr) -> io::Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (up, _) = watch::channel(true);
        let proxy = Arc::new(Self {
            addr: listener.local_addr()?,
            target,
            up,
            running: Mutex::new(None),
            round_trips: Arc::new(AtomicU64::new(0)),
        });
        *proxy.running.lock().await = Some(tokio::spawn(serve(
            listener,
            target,
            proxy.up.subscribe(),
            proxy.round_trips.clone(),
        )));
        Ok(proxy)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Round trips so far, over every connection: each time a server answers after
    /// its client sent something (a pipeline of commands written at once is one).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::SeqCst)
    }

    /// Stop accepting and cut every open connection.
    pub async fn cut(&self) {
        self.up.send_replace(false);
        if let Some(task) = self.running.lock().await.take() {
            let _ = task.await;
        }
    }

    /// Accept again on the same port.
    pub async fn restore(&self) -> io::Result<()> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr).await?;
        self.up.send_replace(true);
        *running = Some(tokio::spawn(serve(
            listener,
            self.target,
            self.up.subscribe(),
            self.round_trips.clone(),
        )));
        Ok(())
    }
}

async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    up: watch::Receiver<bool>,
    round_trips: Arc<AtomicU64>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut down = up.clone();
    loop {
        tokio::select! {
            _ = down.wait_for(|u| !*u) => break,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                connections.spawn(pipe(client, target, up.clone(), round_trips.clone()));
            }
        }
    }
    // Dropping the set aborts every connection task, closing both sides.
    connections.shutdown().await;
}

async fn pipe(
    client: TcpStream,
    target: SocketAddr,
    mut up: watch::Receiver<bool>,
    round_trips: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    // Not `copy_bidirectional`: the copy towards the client counts a round trip on the
    // first bytes after the client spoke.
    let client_spoke = AtomicBool::new(false);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buf).await {
            client_spoke.store(true, Ordering::SeqCst);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let answers = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
            if client_spoke.swap(false, Ordering::SeqCst) {
                round_trips.fetch_add(1, Ordering::SeqCst);
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::select! {
        _ = up.wait_for(|u| !*u) => {}
        _ = async { tokio::join!(requests, answers) } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cut_drops_connections_and_restore_serves_again() -> io::Result<()> {
        // An echo server as the target.
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let target = echo.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = OutageProxy::start(target).await?;
        let mut c = TcpStream::connect(proxy.addr()).await?;
        c.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        assert_eq!(proxy.round_trips(), 1);
        proxy.cut().await;
        // The open connection is closed, and new ones are refused.
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).await.unwrap_or(0), 0);
        assert!(TcpStream::connect(proxy.addr()).await.is_err());
        proxy.restore().await?;
        let mut c = TcpStream::connect(proxy.addr()).await?;
        c.write_all(b"pong").await?;
        c.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        assert_eq!(
            proxy.round_trips(),
            2,
            "counted across connections and restarts"
        );
        Ok(())
    }
}
