use super::*;
use peerix_chunkstore::ChunkRef;

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

/// Every reply decodes to what was encoded, as the answer to the request it answers, and is
/// malformed as the answer to another.
#[test]
fn replies_round_trip_and_answer_only_their_request() {
    let have = |n_chunks: usize, n_nars: usize| Request::Have {
        chunks: vec![ChunkId([1; 32]); n_chunks],
        nars: vec![Sha256Hash([2; 32]); n_nars],
    };
    let frame = |r: &Reply| {
        let (kind, body) = r.encode();
        Frame { kind, body }
    };
    let r = Reply::Have(HaveReply {
        chunks: vec![true, false, true, true, false, false, false, false, true],
        nars: vec![NarState::Partial, NarState::None, NarState::Complete],
    });
    assert_eq!(Reply::decode(&frame(&r), &have(9, 3)).unwrap(), r);
    assert!(Reply::decode(&frame(&r), &have(17, 3)).is_err());

    let info: NarInfo =
        "StorePath: /nix/store/00000000000000000000000000000000-a\nURL: nar/x.nar\n\
Compression: none\nNarHash: sha256:0000000000000000000000000000000000000000000000000000\n\
NarSize: 8\nReferences: \n"
            .parse()
            .unwrap();
    let r = Reply::Lookup(vec![info.clone()]);
    let asked = Request::Lookup(vec![info.store_path.hash()]);
    assert_eq!(Reply::decode(&frame(&r), &asked).unwrap(), r);
    let other = Request::Lookup(vec![StorePathHash([9; 20])]);
    assert!(
        Reply::decode(&frame(&r), &other).is_err(),
        "a path not looked up"
    );
    assert!(
        Reply::decode(&frame(&r), &have(0, 0)).is_err(),
        "another kind"
    );

    let m = Manifest {
        nar_size: 5,
        nar_hash: Sha256Hash([3; 32]),
        chunks: vec![ChunkRef {
            id: ChunkId([4; 32]),
            len: 5,
        }],
    };
    let r = Reply::Manifest(Some(m.clone()));
    let asked = Request::Manifest(m.nar_hash);
    assert_eq!(Reply::decode(&frame(&r), &asked).unwrap(), r);
    let other = Request::Manifest(Sha256Hash([5; 32]));
    assert!(Reply::decode(&frame(&r), &other).is_err(), "another NAR");
    let none = Reply::Manifest(None);
    assert_eq!(Reply::decode(&frame(&none), &other).unwrap(), none);

    let busy = Reply::Refused(Refusal::Banned);
    assert_eq!(Reply::decode(&frame(&busy), &asked).unwrap(), busy);
}
