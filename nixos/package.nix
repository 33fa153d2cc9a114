{ lib, rustPlatform, pkg-config, cmake, perl }:

rustPlatform.buildRustPackage {
  pname = "peerix";
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path; in
      !(builtins.elem base [ "target" ".git" "result" ]);
  };
  cargoLock.lockFile = ../Cargo.lock;

  # Bundled SQLite, zstd and the TLS backend build C code.
  nativeBuildInputs = [ pkg-config cmake perl ];
  cargoBuildFlags = [ "--package" "peerix" ];

  # The test suite needs root, network namespaces and a real Nix with chroot stores; it runs
  # in CI (scripts/test.sh), not inside the Nix sandbox.
  doCheck = false;

  meta = {
    description = "A peer-to-peer binary cache for Nix";
    license = lib.licenses.mit;
    mainProgram = "peerix";
    platforms = lib.platforms.linux;
  };
}
