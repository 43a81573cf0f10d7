//! A cloneable shutdown signal: fired once by SIGTERM or Ctrl-C (or by a test), awaited by every
//! loop that must stop cleanly.

use std::time::Duration;

use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Fires the [`Shutdown`] it was created with.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

impl Trigger {
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }
}

/// Shutdown was requested.
#[derive(Debug)]
pub struct ShuttingDown;

impl Shutdown {
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger { tx }, Shutdown { rx })
    }

    /// A signal fired by SIGTERM or Ctrl-C.
    pub fn on_signals() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing SIGTERM handler");
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            ctrl_c.await.ok();
            tracing::info!("shutdown requested");
            trigger.fire();
        });
        shutdown
    }

    pub fn is_fired(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when shutdown is requested.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone: treat as shut down.
        let _ = rx.wait_for(|fired| *fired).await;
    }

    /// Sleeps for `duration`, or returns `Err` early if shutdown is requested meanwhile.
    pub async fn sleep(&self, duration: Duration) -> Result<(), ShuttingDown> {
        tokio::select! {
            _ = self.wait() => Err(ShuttingDown),
            _ = tokio::time::sleep(duration) => Ok(()),
        }
    }
}
