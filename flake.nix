{
  description = "peerix: a peer-to-peer binary cache for Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        peerix = final.callPackage ./nixos/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        peerix = pkgs.callPackage ./nixos/package.nix { };
        default = peerix;
      });

      apps = forAllSystems (pkgs: rec {
        peerix = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.peerix}/bin/peerix";
        };
        default = peerix;
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.peerix ];
          packages = with pkgs; [ cargo rustc clippy rustfmt cargo-nextest nix ];
        };
      });

      nixosModules = rec {
        peerix = import ./nixos/module.nix self;
        default = peerix;
      };
    };
}
