# nixos/module.nix evaluated with nixpkgs' lib alone (tests/data/nixpkgs-lib, MIT): the NixOS
# options the module sets are declared here as stand-ins, and `pkgs` is the little it uses.
# evalModules does not check assertions, so the failed ones are returned for the test to look at,
# with each service's command line, the warnings, nix.settings and the firewall.
{ config }:
let
  lib = import ./nixpkgs-lib/lib;
  inherit (lib) mkOption types;
  freeform = mkOption {
    type = types.attrsOf types.anything;
    default = { };
  };
  fakePeerix = {
    type = "derivation";
    name = "peerix-0.1.0";
    pname = "peerix";
    version = "0.1.0";
    outPath = "/nix/store/00000000000000000000000000000000-peerix-0.1.0";
    meta.mainProgram = "peerix";
  };
  pkgs = {
    stdenv.hostPlatform.system = "x86_64-linux";
    formats.toml = { }: {
      type = types.attrsOf types.anything;
      generate = name: _value: "/nix/store/00000000000000000000000000000000-${name}";
    };
  };
  standIns = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      systemd.services = mkOption {
        type = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });
        default = { };
      };
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      users.users = freeform;
      users.groups = freeform;
      nix.settings = freeform;
      networking.firewall = freeform;
    };
  };
  self.packages.x86_64-linux.peerix = fakePeerix;
  eval = lib.evalModules {
    modules = [
      standIns
      (import ../../nixos/module.nix self)
      config
    ];
    specialArgs = { inherit pkgs; };
  };
in
{
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) eval.config.assertions);
  execStart = lib.mapAttrs (_: s: s.serviceConfig.ExecStart) eval.config.systemd.services;
  serviceConfig = lib.mapAttrs (_: s: removeAttrs s.serviceConfig [ "ExecStart" ]) eval.config.systemd.services;
  tmpfiles = eval.config.systemd.tmpfiles.rules;
  warnings = eval.config.warnings;
  nixSettings = eval.config.nix.settings;
  firewall = eval.config.networking.firewall;
}
