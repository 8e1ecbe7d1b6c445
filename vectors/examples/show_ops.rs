//! Prints the operations an `rs_ops` or `node_ops` input decodes to (debugging aid).
use arbitrary::{Arbitrary, Unstructured};
use vectors::harness::ops::{NodeOp, RsOp};

fn show<'a, T: Arbitrary<'a> + std::fmt::Debug>(data: &'a [u8]) {
    let mut u = Unstructured::new(data);
    println!("seed {:?}", u64::arbitrary(&mut u));
    let mut i = 0;
    while !u.is_empty() && i < vectors::harness::MAX_OPS {
        match T::arbitrary(&mut u) {
            Ok(op) => println!("op {i} {op:?}"),
            Err(_) => break,
        }
        i += 1;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let data = std::fs::read(&args[2]).expect("input file");
    match args[1].as_str() {
        "rs_ops" => show::<RsOp>(&data),
        "node_ops" => show::<NodeOp>(&data),
        t => panic!("unknown target {t}"),
    }
}
