//! Hand-written futures of the event loop. Each is in the select of every connection's event
//! loop, and an `async fn`'s state would be larger than the references these hold: an idle
//! connection's memory is mostly its task's future.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{Event, IDLE_READ};

/// Writes what `output` holds, or flushes when it is empty, if `write`; else (or while that
/// cannot proceed) reads what the client sent into `input`, if `read`. Writing first lets
/// output drain before more input adds to it.
///
/// A hand-written future (as are the ones below): each is in the select of every connection's
/// event loop, and an `async fn`'s state would be larger than the references this one holds.
pub(super) fn read_or_write<'a, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &'a mut S,
    input: &'a mut BytesMut,
    read: bool,
    output: &'a mut BytesMut,
    write: bool,
) -> impl Future<Output = Event> + 'a {
    std::future::poll_fn(move |cx| {
        if write {
            if let Poll::Ready(wrote) = poll_write_or_flush(Pin::new(&mut *stream), cx, output) {
                return Poll::Ready(Event::Wrote(wrote));
            }
        }
        if read {
            if let Poll::Ready(read) = poll_read_into(Pin::new(&mut *stream), cx, input) {
                return Poll::Ready(Event::Read(read));
            }
        }
        Poll::Pending
    })
}

fn poll_write_or_flush<S: AsyncWrite>(
    stream: Pin<&mut S>,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<Option<usize>>> {
    if buf.is_empty() {
        return stream.poll_flush(cx).map_ok(|()| None);
    }
    let written = std::task::ready!(stream.poll_write(cx, buf))?;
    buf.advance(written);
    Poll::Ready(Ok(Some(written)))
}

/// A released buffer (a quiet client's) is not given memory until bytes arrive: they are read
/// into the stack first, so an idle connection waits holding no read buffer at all.
fn poll_read_into<S: AsyncRead + Unpin>(
    mut stream: Pin<&mut S>,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() > 0 {
        return std::pin::pin!(stream.read_buf(&mut *buf)).poll(cx);
    }
    // Uninitialised: a subscriber with no read buffer is polled here on every wake-up for
    // deliveries, and zeroing the landing each time would be wasted work.
    let mut landing = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_READ];
    let mut landed = tokio::io::ReadBuf::uninit(&mut landing);
    std::task::ready!(stream.as_mut().poll_read(cx, &mut landed))?;
    buf.extend_from_slice(landed.filled());
    Poll::Ready(Ok(landed.filled().len()))
}

/// Resolves when the boxed future in `slot` does; never when the slot is empty.
pub(super) fn completion_of<F: Future + ?Sized>(
    slot: &mut Option<Pin<Box<F>>>,
) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match slot {
        Some(future) => future.as_mut().poll(cx).map(|_| ()),
        None => Poll::Pending,
    })
}
