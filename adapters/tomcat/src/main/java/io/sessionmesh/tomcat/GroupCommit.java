package io.sessionmesh.tomcat;

import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.locks.LockSupport;
import java.util.concurrent.locks.ReentrantLock;

/**
 * Group commit of the requests' session changes: the writes of requests that
 * finish while a batch is on its way to the sidecar go together in the next
 * one ({@code POST /v1/batch}), and each request still returns only once its
 * own write is answered (acknowledged by the peers, in sync mode).
 *
 * <p>No timer and no waiting for company: a write that finds nothing under
 * way is sent at once, alone. Batches grow only when writes arrive faster than
 * the sidecar answers, which is when the saving matters: one exchange with the
 * sidecar, and one replication round, for many requests.
 *
 * <p>One thread at a time sends (the leader); the others park. A leader sends
 * until its own write is answered, then hands the lead to the oldest waiting
 * write's thread, so no request sends other requests' writes for long.
 */
final class GroupCommit {
    /** Sends one batch: one result per write, in order (a {@link SidecarClient.Written}
     *  or the {@link SidecarClient.Refused} of that write). */
    interface Sender {
        List<Object> send(List<SidecarClient.BatchWrite> writes) throws IOException;
    }

    private static final class Pending {
        final SidecarClient.BatchWrite write;
        final Thread thread;
        volatile boolean lead;
        volatile boolean done;
        Object result;
        IOException failure;

        Pending(SidecarClient.BatchWrite write, Thread thread) {
            this.write = write;
            this.thread = thread;
        }
    }

    private final Sender sender;
    private final int maxWrites;
    private final int maxChars;
    private final ReentrantLock lock = new ReentrantLock();
    private ArrayList<Pending> queue = new ArrayList<>(); // guarded by lock
    private boolean sending; // guarded by lock
    /** Written under lock only. */
    private volatile long batches;
    private volatile long writes;

    GroupCommit(Sender sender, int maxWrites, int maxChars) {
        this.sender = sender;
        this.maxWrites = maxWrites;
        this.maxChars = maxChars;
    }

    /** Batches sent so far. */
    long batches() {
        return batches;
    }

    /** Writes sent so far. */
    long writes() {
        return writes;
    }

    /** Writes waiting for the next batch (tests). */
    int queued() {
        lock.lock();
        try {
            return queue.size();
        } finally {
            lock.unlock();
        }
    }

    /** Sends the write (with whatever else is waiting) and returns its result. */
    SidecarClient.Written submit(SidecarClient.BatchWrite w) throws IOException {
        Pending me = new Pending(w, Thread.currentThread());
        lock.lock();
        try {
            queue.add(me);
            if (!sending) {
                sending = true;
                me.lead = true;
            }
        } finally {
            lock.unlock();
        }
        boolean interrupted = false;
        while (!me.lead && !me.done) {
            LockSupport.park(this);
            interrupted |= Thread.interrupted();
        }
        if (interrupted) {
            Thread.currentThread().interrupt();
        }
        if (!me.done) {
            lead(me);
        }
        if (me.failure != null) {
            throw me.failure;
        }
        if (me.result instanceof SidecarClient.Refused) {
            throw (SidecarClient.Refused) me.result;
        }
        return (SidecarClient.Written) me.result;
    }

    /** Sends batches until {@code me} is answered, then passes the lead on
     *  (also when sending failed with an Error: no request is left parked). */
    private void lead(Pending me) {
        try {
            do {
                send(take());
            } while (!me.done);
        } finally {
            lock.lock();
            try {
                if (queue.isEmpty()) {
                    sending = false;
                } else {
                    Pending next = queue.get(0);
                    next.lead = true;
                    LockSupport.unpark(next.thread);
                }
            } finally {
                lock.unlock();
            }
        }
    }

    /** The oldest waiting writes, within the batch's bounds (at least one). */
    private List<Pending> take() {
        lock.lock();
        try {
            int n = 0;
            int chars = 0;
            while (n < queue.size() && n < maxWrites) {
                chars += queue.get(n).write.size();
                if (n > 0 && chars > maxChars) {
                    break;
                }
                n++;
            }
            List<Pending> batch;
            if (n == queue.size()) {
                batch = queue;
                queue = new ArrayList<>();
            } else {
                batch = new ArrayList<>(queue.subList(0, n));
                queue.subList(0, n).clear();
            }
            batches++;
            writes += batch.size();
            return batch;
        } finally {
            lock.unlock();
        }
    }

    private void send(List<Pending> batch) {
        List<SidecarClient.BatchWrite> ws = new ArrayList<>(batch.size());
        for (Pending p : batch) {
            ws.add(p.write);
        }
        List<Object> results = null;
        IOException failure = null;
        Error fatal = null;
        try {
            results = sender.send(ws);
            if (results.size() != batch.size()) {
                failure = new SidecarClient.Refused(0, "a batch answer without one result per write");
            }
        } catch (IOException e) {
            failure = e;
        } catch (RuntimeException e) {
            failure = new SidecarClient.Refused(0, "the batch failed: " + e);
        } catch (Error e) {
            // The waiting requests get an answer before the error goes on up.
            failure = new SidecarClient.Refused(0, "the batch failed: " + e);
            fatal = e;
        }
        for (int i = 0; i < batch.size(); i++) {
            Pending p = batch.get(i);
            if (failure != null) {
                p.failure = failure;
            } else {
                p.result = results.get(i);
            }
            // done is volatile: written last, it publishes result and failure.
            p.done = true;
            if (p.thread != Thread.currentThread()) {
                LockSupport.unpark(p.thread);
            }
        }
        if (fatal != null) {
            throw fatal;
        }
    }
}
