//! A TCP proxy in front of Postgres that a test can take down (every connection cut, new ones
//! refused) and bring back: a database outage as the service sees it, without touching the
//! server other tests share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct Proxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Forwards `127.0.0.1:<port>` to `target` (`host:port`).
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (down2, connections2) = (down.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                // Under the lock that `take_down` holds, so that a connection accepted while the
                // proxy goes down is either refused here or cut there.
                let mut open = connections2.lock().expect("lock");
                if down2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                open.push(task.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            port,
            down,
            connections,
            accept,
        }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn take_down(&self) {
        let mut open = self.connections.lock().expect("lock");
        self.down.store(true, Ordering::SeqCst);
        for c in open.drain(..) {
            c.abort();
        }
    }

    pub fn bring_up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.connections.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
}
