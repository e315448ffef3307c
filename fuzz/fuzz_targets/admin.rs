//! The admin request handling without a socket: a request built from the
//! input (method, target, headers; what hyper would have parsed), a peer
//! and a configured token or none, through `admin::route`. Beyond not
//! crashing: the stop flag is set only by a `POST /admin/stop` that is
//! authorized (the right bearer token, or no token configured and the pod
//! itself as the peer), and then the answer is 202.
#![no_main]

use libfuzzer_sys::fuzz_target;

const TOKEN: &[u8] = b"s3cret";
const PEERS: [&str; 6] = [
    "127.0.0.1:1",
    "[::1]:1",
    "[::ffff:127.0.0.1]:1",
    "127.0.0.6:1",
    "10.0.0.7:1",
    "[fe80::1]:1",
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let peer: std::net::SocketAddr = PEERS[usize::from(first & 7) % PEERS.len()].parse().unwrap();
    let with_token = first & 8 != 0;
    // Lines: method, target, then `name: value` headers.
    let mut lines = rest.split(|&b| b == b'\n');
    let method = lines.next().unwrap_or_default();
    let target = lines.next().unwrap_or_default();
    let mut b = http::Request::builder().method(method).uri(target);
    let mut auth_ok = false;
    for line in lines {
        let Some(i) = line.iter().position(|&c| c == b':') else {
            continue;
        };
        let (name, value) = (&line[..i], line[i + 1..].trim_ascii_start());
        if name.eq_ignore_ascii_case(b"authorization") {
            let ok = value.len() == 7 + TOKEN.len()
                && value[..7].eq_ignore_ascii_case(b"bearer ")
                && &value[7..] == TOKEN;
            // Only the first Authorization header counts.
            if !b
                .headers_ref()
                .is_some_and(|h| h.contains_key("authorization"))
            {
                auth_ok = ok;
            }
        }
        b = b.header(name, value);
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    let (status, stopped) = drover::fuzzing::admin(&req, peer, with_token.then_some(TOKEN));
    assert!((100..600).contains(&status));
    if stopped {
        assert_eq!(status, 202);
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(req.uri().path(), "/admin/stop");
        let pod_itself =
            ["127.0.0.1", "::1", "::ffff:127.0.0.1"].contains(&peer.ip().to_string().as_str());
        assert!(if with_token { auth_ok } else { pod_itself });
    }
});
