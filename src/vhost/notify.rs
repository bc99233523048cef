//! Telling the frontend that the config space changed (the disk grew).
//!
//! The message travels on the back-end request channel, a socket the
//! frontend hands over with SET_BACKEND_REQ_FD once BACKEND_REQ is
//! negotiated. The `vhost` crate keeps that socket inside its `Backend`
//! and has no call for CONFIG_CHANGE_MSG, so we keep a socket of our own:
//! before the crate reads a message, we peek at it, and when it is
//! SET_BACKEND_REQ_FD, a second peek with room for the descriptor installs
//! a duplicate of it here (Linux passes descriptors on a peek too). The
//! crate then reads the message as usual.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{BackendReq, FrontendReq};

/// Bytes of a vhost-user message header: request, flags, size (u32 each).
const HEADER_BYTES: usize = 12;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;

/// A message header with no body.
fn header(request: u32) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    h
}

/// If the next message on `conn` is SET_BACKEND_REQ_FD, a duplicate of the
/// socket it carries. Blocks until a message (or the end) arrives, as the
/// crate's own read would; never consumes anything. (A frontend sends each
/// message in one piece, so the header is there whole.)
pub fn peek_backend_req_fd(conn: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let mut hdr = [0u8; HEADER_BYTES];
    // SAFETY: recv into a local buffer of its length, on a descriptor that
    // `conn` keeps open.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let code = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    if n as usize != HEADER_BYTES || code != FrontendReq::SET_BACKEND_REQ_FD as u32 {
        return Ok(None);
    }
    peek_fd(conn)
}

/// Peek at the next message again, with room for one descriptor.
fn peek_fd(conn: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let mut hdr = [0u8; HEADER_BYTES];
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    // Room for one cmsghdr and one int, aligned as cmsghdr wants.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    debug_assert!(msg.msg_controllen <= std::mem::size_of_val(&cbuf));
    // SAFETY: msg points at live local buffers of the sizes it states;
    // MSG_CMSG_CLOEXEC makes any descriptor we get close-on-exec.
    let n = unsafe {
        libc::recvmsg(
            conn.as_raw_fd(),
            &mut msg,
            libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    // SAFETY: walking the control buffer recvmsg filled, with the libc
    // macros, which stay inside msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const i32;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<i32>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // Each descriptor installed by the peek is ours to own
                    // (and to close, for any but the first).
                    let owned = OwnedFd::from_raw_fd(fd);
                    if found.is_none() {
                        found = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(found)
}

/// Send CONFIG_CHANGE_MSG on the back-end request socket `fd`, without
/// asking for a reply (QEMU then sends none, so nothing is left to read
/// on a socket the crate also owns).
pub fn send_config_change(fd: &OwnedFd) -> io::Result<()> {
    let hdr = header(BackendReq::CONFIG_CHANGE_MSG as u32);
    let bytes = &hdr[..];
    // SAFETY: send from a live local value of its length on a descriptor
    // `fd` keeps open.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write of the config change message",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_peeked_backend_req_fd_reaches_the_frontend_and_the_message_stays_unread() {
        let (mut frontend, backend) = UnixStream::pair().unwrap();
        let (mut req_front, req_back) = UnixStream::pair().unwrap();
        // SET_BACKEND_REQ_FD with req_back attached, as QEMU sends it.
        let hdr = header(FrontendReq::SET_BACKEND_REQ_FD as u32);
        let iov = [std::io::IoSlice::new(&hdr)];
        let fds = [req_back.as_fd().as_raw_fd()];
        send_with_fd(&frontend, &iov, &fds);
        drop(req_back);
        let fd = peek_backend_req_fd(&backend)
            .unwrap()
            .expect("a descriptor");
        // The message is still there, whole, for the crate.
        let mut again = [0u8; HEADER_BYTES];
        let mut b = &backend;
        b.read_exact(&mut again).unwrap();
        assert_eq!(again, hdr);
        send_config_change(&fd).unwrap();
        let mut got = [0u8; HEADER_BYTES];
        req_front.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_le_bytes(got[0..4].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(got[4..8].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(got[8..12].try_into().unwrap()), 0);
        // Other messages are left alone.
        frontend
            .write_all(&header(FrontendReq::GET_FEATURES as u32))
            .unwrap();
        assert!(peek_backend_req_fd(&backend).unwrap().is_none());
    }

    fn send_with_fd(s: &UnixStream, iov: &[std::io::IoSlice], fds: &[i32]) {
        let mut cbuf = [0u64; 8];
        // SAFETY: test scaffolding: a msghdr over live local buffers.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len();
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4 * fds.len() as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4 * fds.len() as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
            assert!(libc::sendmsg(s.as_raw_fd(), &msg, 0) > 0);
        }
    }
}
