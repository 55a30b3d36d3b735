//! The datastore methods on a datastore in memory, through the method table as the control
//! socket and stratactl run them.
// Test code: helpers outside #[test] functions panic on failure too.
#![allow(clippy::unwrap_used)]

use super::*;
use jsonrpc::ErrorCode;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use vmfs::device::SimDisk;
use vmfs::fs::MkfsOptions;

const VOL: u64 = 256 << 20;

fn table(progress_calls: Arc<AtomicU64>) -> Methods {
    let disk = Arc::new(SimDisk::new(VOL));
    Datastore::mkfs(disk.clone(), &MkfsOptions { uuid: None }, &mut |_, _| {}).unwrap();
    let ds = Arc::new(Datastore::mount(disk).unwrap());
    let mut m = Methods::new();
    register(
        &mut m,
        Some(ds),
        Arc::new(move |_, _| {
            progress_calls.fetch_add(1, Ordering::Relaxed);
        }),
    );
    m
}

#[test]
fn the_methods_create_list_resize_and_delete() {
    let calls = Arc::new(AtomicU64::new(0));
    let m = table(calls.clone());
    let info = m.call(DATASTORE_INFO, json!({})).unwrap();
    assert_eq!(info["volume_bytes"], VOL);
    let c = m.call(DATASTORE_MKDIR, json!({"path": "/vms"})).unwrap();
    assert!(c["ino"].as_u64().unwrap() > 0);
    m.call(
        DATASTORE_DISK_CREATE,
        json!({"name": "/vms/a.img", "size": "1M", "provisioning": "thick"}),
    )
    .unwrap();
    assert!(
        calls.load(Ordering::Relaxed) > 0,
        "eager zeroing reports progress"
    );
    m.call(
        DATASTORE_DISK_CREATE,
        json!({"name": "/vms/b.img", "size": 4096}),
    )
    .unwrap();
    let ls = m.call(DATASTORE_LS, json!({"path": "/vms"})).unwrap();
    assert_eq!(ls[0]["name"], "a.img");
    assert_eq!(ls[0]["provisioning"], "thick");
    assert_eq!(ls[1]["size"], 4096);
    assert_eq!(ls[1]["provisioning"], "thin");
    let r = m
        .call(
            DATASTORE_DISK_RESIZE,
            json!({"name": "/vms/b.img", "size": "8K"}),
        )
        .unwrap();
    assert_eq!(r, json!({}));
    let ls: Vec<Value> = m
        .call_typed(
            DATASTORE_LS,
            &LsParams {
                path: "/vms".into(),
            },
        )
        .unwrap();
    assert_eq!(ls[1]["size"], 8192);
    m.call(DATASTORE_DISK_DELETE, json!({"name": "/vms/b.img"}))
        .unwrap();
    let root = m.call(DATASTORE_LS, json!({})).unwrap();
    assert_eq!(root.as_array().unwrap().len(), 1, "{root}");
    let names = m.call("rpc_get_methods", json!({})).unwrap();
    assert_eq!(
        names,
        json!([
            "datastore_disk_create",
            "datastore_disk_delete",
            "datastore_disk_resize",
            "datastore_info",
            "datastore_ls",
            "datastore_mkdir",
            "rpc_get_methods"
        ])
    );
}

#[test]
fn bad_params_and_datastore_refusals_have_their_codes() {
    let m = table(Arc::default());
    for p in [
        json!({"name": "x", "size": "12Q"}),
        json!({"name": "x", "size": "1M", "provisioning": "fat"}),
        json!({"size": "1M"}),
        json!({"name": "x", "size": -5}),
    ] {
        let e = m.call(DATASTORE_DISK_CREATE, p.clone()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParams, "{p}: {e}");
    }
    let e = m
        .call(DATASTORE_DISK_DELETE, json!({"name": "/nope"}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Application(DATASTORE_ERROR), "{e}");
}

#[test]
fn without_a_datastore_the_methods_say_so() {
    let mut m = Methods::new();
    register(&mut m, None, Arc::new(|_, _| {}));
    let e = m.call(DATASTORE_INFO, json!({})).unwrap_err();
    assert_eq!(e.code, ErrorCode::Application(NO_DATASTORE));
    assert_eq!(e.message, "stratad runs without a datastore");
}
