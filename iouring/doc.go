// Package iouring is hcache's block I/O layer: an io_uring engine written on
// raw golang.org/x/sys/unix syscalls (io_uring_setup, io_uring_enter,
// io_uring_register), an aligned buffer pool whose memory can be registered
// with the ring (and later pinned for a GPU), and a fallback engine with the
// same interface that runs pread/pwrite on a bounded worker pool.
//
// # Model
//
// Callers build Requests and hand a batch to Engine.Submit with a completion
// callback, or to Engine.Do, which blocks until every request of the batch has
// completed. Many goroutines may submit to one engine at once: they queue
// their requests for the ring goroutine (one per ring, locked to its OS
// thread), which alone fills the SQ, enters the kernel, reaps completions and
// runs the callbacks; it is woken through an eventfd read armed in the ring.
// There is no goroutine per I/O.
//
// The number of requests in flight is bounded by the ring size (Config.Entries),
// so the completion queue can never overflow: a submitter waits for a free slot.
//
// Short reads and writes are resumed from where they stopped; EINTR and EAGAIN
// are retried; every other error (ECANCELED, EIO, EBADF, EINVAL ...) completes
// the request with an *IOError naming the operation, descriptor and offset.
// A read that reaches end of file before its buffer is full fails with
// io.ErrUnexpectedEOF.
//
// # One ring goroutine
//
// A ring per engine, set up with `io_uring_setup`, its SQ/CQ/SQE areas mmap'd
// (one mapping when the kernel offers it), opcodes probed. One **ring
// goroutine**, locked to its OS thread, is the only one that touches the SQ and
// CQ: submitters (any goroutines) take in-flight slots, append their requests
// to a queue under a mutex and, if the ring goroutine sleeps, wake it by
// writing an eventfd. The ring goroutine places the SQEs, enters the kernel
// once per batch (submitting only, never waiting there), reaps every CQE
// available and runs each request's completion callback — no goroutine per
// I/O. Why one thread: the completion of block I/O is posted as task work of
// the task that submitted it, so when requests came from whatever thread a
// goroutine ran on, each completion had to wake that (often parked) thread
// before the waiting one; reads ran at 0.6 of fio at QD 8–32, and at fio's
// speed after the change.
//
// # Where the ring goroutine sleeps
//
// The same eventfd is registered with the
// ring (`IORING_REGISTER_EVENTFD`), so the kernel signals it for every CQE it
// posts; the ring goroutine sleeps reading it through the Go netpoller (the
// descriptor is non-blocking), after checking the submit queue and the CQ once
// more with its `sleeping` flag set (a completion or a submission after that
// check signals the eventfd). It used to sleep in `io_uring_enter(GETEVENTS)`.
// A goroutine blocked in a system call keeps its P until sysmon takes it back,
// and sysmon, once it has backed off, looks only every 10 ms: with CPU-bound
// goroutines on every other P (the projection of a restore beside its reads),
// each completion left one of them waiting for a P for milliseconds, and the
// reads themselves were reaped late: on the 2-core development machine a
// projection beside its restore's reads took markedly longer than alone, and
// after the change nearly as long (development timings, not kept; `hcache
// bench pipeline` (package bench/benchpipe) measures the overlap, with committed output). A
// goroutine parked in the netpoller gives its P up at once
// (`TestRingWaitsInNetpoller` checks that the ring goroutine waits in "IO
// wait", not "syscall", with a read in flight). The task work still runs on
// the ring's thread: the kernel interrupts its futex sleep for it. NewRing
// fails if the eventfd did not enter the netpoller (its reads would fail with
// EAGAIN), and Close closes it under a lock that wake-ups take, so a Submit
// after Close writes into no file that has since taken its number
// (`TestSubmitAfterCloseTouchesNoFile`). What remains: when every P runs
// CPU-bound goroutines, the netpoller is polled by sysmon only, about every
// 10 ms, so completions can be handled that late; no P is held meanwhile.
//
// # In-flight bound, errors and the fallback engine
//
// In-flight requests are bounded by the SQ size less one (slots
// handed out by one acquirer at a time, so batches never deadlock), which
// keeps the CQ from overflowing. Short transfers are resumed from where they
// stopped (a linked successor cancelled by the short one is resubmitted after
// it); EINTR/EAGAIN retried; other errors surface as `*IOError` with op, fd,
// offset and length; a read past EOF is `io.ErrUnexpectedEOF`; a misaligned
// transfer on an `O_DIRECT` descriptor is refused before submission with an
// explanation (the descriptor's flags are asked only when a request is
// misaligned). Buffers inside a registered region use `READ_FIXED`/`WRITE_FIXED`;
// files can be registered. `RegisterPool` raises `RLIMIT_MEMLOCK` when allowed
// and otherwise logs and uses plain reads. The fallback engine (pread/pwrite/
// preadv/pwritev on a bounded worker pool, a chain on one worker) is chosen when
// `io_uring_setup` fails (seccomp: EPERM/ENOSYS) or by `Kind: "fallback"`.
//
// # Aligned buffers and huge pages
//
// Aligned buffers are anonymous mmaps, populated up front (first-touch faults
// cost several times what populating up front does on the development machine,
// and huge pages less again; development timings, not kept), and those
// of 2 MiB or more are 2 MiB-aligned and advised `MADV_HUGEPAGE`: a 1 MiB
// transfer from scattered 4 KiB pages needs 256 segments, more than the virtio
// disk takes in one request (`max_segments` 254), and is split in two; with huge
// pages it stays whole. That alone moved reads at QD 8 from 0.6 to 1.0 of fio
// (whose own buffers are split).
package iouring
