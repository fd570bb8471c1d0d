//! The SQLite request log's writer: one connection of its own on a thread of its own,
//! inserting each batch in one transaction with prepared multi-row statements, every
//! value bound straight from the records.
//!
//! Why not the sqlx pool that serves every other query: through sqlx's `Any` driver a
//! row cost about 26k instructions besides SQLite's own ~31k (each value cloned into an
//! `AnyValue`, converted to a SQLite argument, handed to the connection's worker thread,
//! bound, and the statement's iterator driven back), measured with callgrind at 100
//! requests a second (bench/instructions.sh). The request log writes a row per request,
//! the hottest statement the gateway runs; rusqlite over the same libsqlite3-sys binds
//! borrowed values with no copy of ours (SQLite still copies each text it is given),
//! which took 12k–17k instructions off a request (bench/RESULTS.md, Run 26). Reads,
//! migrations and PostgreSQL stay on sqlx.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Statement};
use tokio::sync::oneshot;

use super::{Backend, INSERT_ROWS, Value, insert_sql, values};
use crate::telemetry::RecordBatch;

/// A batch to write, and where to say how it went.
struct Job {
    batch: RecordBatch,
    done: oneshot::Sender<rusqlite::Result<()>>,
}

pub(super) struct LogWriter {
    /// `None` once closed.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Fires when the thread has closed its connection.
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
    /// False once the thread has ended, however it ended (a panic too).
    running: Arc<AtomicBool>,
}

/// Marks the writer stopped when the thread ends, by return or by panic.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Where the writer's connection goes.
pub(super) enum Target<'a> {
    File(&'a Path),
    /// A shared-cache in-memory database of this name, the one the sqlx pool opened.
    Memory(&'a str),
}

impl LogWriter {
    /// Open the connection (the schema must exist: migrations run first) and start the
    /// thread.
    pub(super) fn open(target: Target<'_>) -> anyhow::Result<LogWriter> {
        let base = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match target {
            Target::File(path) => Connection::open_with_flags(path, base)?,
            Target::Memory(name) => Connection::open_with_flags(
                name,
                base | OpenFlags::SQLITE_OPEN_URI
                    | OpenFlags::SQLITE_OPEN_MEMORY
                    | OpenFlags::SQLITE_OPEN_SHARED_CACHE,
            )?,
        };
        // As the pool's connections: wait for another writer rather than fail, and
        // NORMAL sync under WAL (set on the file by the pool) survives a process crash.
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let running = Arc::new(AtomicBool::new(true));
        let marker = Running(running.clone());
        std::thread::Builder::new()
            .name("sluice-log-writer".into())
            .spawn(move || {
                run(&conn, rx);
                drop(conn);
                // Marked before `close` hears of it (on a panic, the unwinding drops it).
                drop(marker);
                let _ = stopped_tx.send(());
            })?;
        Ok(LogWriter {
            jobs: Mutex::new(Some(tx)),
            stopped: Mutex::new(Some(stopped_rx)),
            running,
        })
    }

    /// Whether the thread is there to write (for `/readyz`: a request log that can no
    /// longer be written is not ready).
    pub(super) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Write `batch` in one transaction; returns once it is committed.
    pub(super) async fn insert(&self, batch: RecordBatch) -> anyhow::Result<()> {
        let (done, result) = oneshot::channel();
        let sent = lock(&self.jobs)
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job { batch, done }).is_ok());
        anyhow::ensure!(sent, "the request log is closed");
        match result.await {
            Ok(written) => Ok(written?),
            Err(_) => anyhow::bail!("the request log's writer stopped"),
        }
    }

    /// Write what is queued, then close the connection.
    pub(super) async fn close(&self) {
        lock(&self.jobs).take();
        let stopped = lock(&self.stopped).take();
        if let Some(stopped) = stopped {
            let _ = stopped.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The thread: one job at a time until every sender is gone.
fn run(conn: &Connection, jobs: mpsc::Receiver<Job>) {
    // Prepared once for the connection's life, one per statement size.
    let mut statements: Vec<Option<Statement<'_>>> = INSERT_ROWS.iter().map(|_| None).collect();
    for job in jobs {
        let written = write(conn, &mut statements, &job.batch);
        if written.is_err() {
            // Whatever failed, leave no transaction open for the next batch.
            let _ = conn.execute_batch("ROLLBACK");
        }
        // Dropped before the reply: the recorder reuses the batch's buffer once it
        // holds the only reference.
        drop(job.batch);
        let _ = job.done.send(written);
    }
}

fn write<'c>(
    conn: &'c Connection,
    statements: &mut [Option<Statement<'c>>],
    batch: &[crate::telemetry::RequestRecord],
) -> rusqlite::Result<()> {
    // IMMEDIATE: take the write lock now, where a busy database is waited for, not
    // midway, where SQLite cannot wait without risking a deadlock.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let mut rest = batch;
    while !rest.is_empty() {
        let (sql, rows, size) = insert_sql(Backend::Sqlite, rest.len());
        let (chunk, tail) = rest.split_at(rows);
        let statement = match &mut statements[size] {
            Some(statement) => statement,
            empty => empty.insert(conn.prepare(sql)?),
        };
        let mut index = 1;
        for record in chunk {
            for value in values(record) {
                match value {
                    Value::Text(v) => statement.raw_bind_parameter(index, v)?,
                    Value::Int(v) => statement.raw_bind_parameter(index, v)?,
                    Value::Real(v) => statement.raw_bind_parameter(index, v)?,
                }
                index += 1;
            }
        }
        statement.raw_execute()?;
        rest = tail;
    }
    conn.execute_batch("COMMIT")
}

#[cfg(test)]
mod tests {

    use super::*;

    #[tokio::test]
    async fn a_closed_writer_is_not_running_and_refuses_batches() {
        let name = format!("file:log-writer-test-{}", std::process::id());
        // Keep the in-memory database alive, with the table, while the writer runs.
        let keep = Connection::open_with_flags(
            &name,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_MEMORY
                | OpenFlags::SQLITE_OPEN_SHARED_CACHE,
        )
        .unwrap();
        keep.execute_batch("CREATE TABLE t (x)").unwrap();
        let writer = LogWriter::open(Target::Memory(&name)).unwrap();
        assert!(writer.running());
        writer.close().await;
        assert!(!writer.running(), "the thread has ended");
        let err = writer
            .insert(Arc::new(Vec::new()))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("closed"), "{err}");
    }
}
