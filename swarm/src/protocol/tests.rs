use super::*;

fn frame_of(req: &Request) -> Vec<u8> {
    let (k, b) = req.encode();
    let mut v = frame_header(k, b.len()).to_vec();
    v.extend_from_slice(&b);
    v
}

async fn read(bytes: &[u8]) -> Result<Request, ProtocolError> {
    read_request(&mut futures::io::Cursor::new(bytes.to_vec())).await
}

#[tokio::test]
async fn requests_round_trip() {
    let reqs = [
        Request::Lookup(vec![StorePathHash([7; 20]); 3]),
        Request::Manifest(Sha256Hash([1; 32])),
        Request::Have {
            chunks: vec![ChunkId([2; 32]); 9],
            nars: vec![Sha256Hash([3; 32])],
        },
        ChunksRequest::raw(vec![ChunkId([4; 32]); 64]).into(),
        ChunksRequest {
            ids: vec![ChunkId([5; 32]); 3],
            want: Want::all(Some(DeltaAsk {
                nar: Sha256Hash([6; 32]),
                bases: vec![Sha256Hash([7; 32]); MAX_DELTA_NARS],
            })),
        }
        .into(),
        ChunksRequest {
            ids: vec![ChunkId([5; 32]); 1],
            want: Want {
                zstd: true,
                ..Want::default()
            },
        }
        .into(),
    ];
    for r in reqs {
        assert_eq!(read(&frame_of(&r)).await.unwrap(), r);
    }
}

#[tokio::test]
async fn bounds_are_checked_before_allocation() {
    // Claims 4 GiB: refused from the header alone.
    let e = read(&[0xff, 0xff, 0xff, 0xff, Kind::Chunks as u8])
        .await
        .unwrap_err();
    assert!(matches!(e, ProtocolError::TooLarge { .. }), "{e}");
    let e = read(&[0, 0, 0, 1, 0x42]).await.unwrap_err();
    assert!(matches!(e, ProtocolError::UnknownType(0x42)), "{e}");
    let e = read(&frame_of(
        &ChunksRequest::raw(vec![ChunkId([0; 32]); 65]).into(),
    ))
    .await
    .unwrap_err();
    assert!(e.is_offence(), "{e}");
    let e = read(&[]).await.unwrap_err();
    assert!(!e.is_offence());
    // Count says 2, body holds 1.
    let mut f = frame_of(&ChunksRequest::raw(vec![ChunkId([0; 32]); 1]).into());
    f[6] = 2;
    assert!(read(&f).await.unwrap_err().is_offence());
}

#[test]
fn replies_round_trip() {
    let r = HaveReply {
        chunks: vec![true, false, true, true, false, false, false, false, true],
        nars: vec![NarState::Partial, NarState::None, NarState::Complete],
    };
    let f = Frame {
        kind: Kind::HaveReply,
        body: encode_have_reply(&r),
    };
    assert_eq!(decode_have_reply(&f, 9, 3).unwrap(), r);
    assert!(decode_have_reply(&f, 17, 3).is_err());
}
