# The NixOS module: `services.peerix`. The options of the earlier peerix modules keep their
# names and meaning; each option maps to a `peerix serve` flag (tests/flake.rs holds them
# against `peerix serve --help`). The options only the Iroh-based peerix had are renamed,
# changed or removed below (`imports`), so its users' configurations still evaluate.
self:
{ config, options, lib, pkgs, ... }:

let
  cfg = config.services.peerix;
  inherit (lib) mkOption mkEnableOption mkIf types optional optionals concatMap;

  withPort = host: if lib.hasInfix ":" host then host else "${host}:${toString cfg.p2pPort}";

  settingsFile = (pkgs.formats.toml { }).generate "peerix.toml" cfg.settings;

  args =
    [ "serve" "--listen" "127.0.0.1:${toString cfg.port}" ]
    ++ [ "--p2p-listen" "/ip4/0.0.0.0/tcp/${toString cfg.p2pPort}" ]
    ++ [ "--p2p-listen" "/ip4/0.0.0.0/udp/${toString cfg.p2pPort}/quic-v1" ]
    ++ [ "--state-dir" cfg.stateDir ]
    ++ [ "--priority" (toString cfg.priority) ]
    ++ [ "--timeout" (toString cfg.timeout) ]
    ++ [ "--scan-interval" (toString cfg.scanInterval) ]
    ++ [ "--max-store-size" cfg.maxStoreSize ]
    ++ optionals (cfg.maxUploadRate != null) [ "--max-upload-rate" cfg.maxUploadRate ]
    ++ optional cfg.capLanUploads "--cap-lan-uploads"
    ++ (if cfg.relay.enable then
          [ "--relay-circuits" (toString cfg.relay.maxCircuits)
            "--relay-circuit-bytes" cfg.relay.maxCircuitBytes
            "--relay-circuit-duration" (toString cfg.relay.maxCircuitDuration) ]
        else [ "--no-relay-service" ])
    ++ [ "--upstream-concurrency" (toString cfg.upstreamConcurrency) ]
    ++ [ "--wire-compression" cfg.wireCompression ]
    ++ optional (!cfg.deltas) "--no-deltas"
    ++ [ "--upstream-cache" (if cfg.upstreamCache == null then "none" else cfg.upstreamCache) ]
    ++ optional cfg.disableBroadcast "--no-mdns"
    ++ optional cfg.shareAll "--share-all"
    ++ optionals (cfg.privateKeyFile != null) [ "--private-key" "%d/peerix.sec" ]
    ++ optionals (cfg.swarmKeyFile != null) [ "--swarm-key" "%d/swarm.key" ]
    ++ concatMap (h: [ "--peer" (withPort h) ]) cfg.extraHosts
    ++ concatMap (a: [ "--bootstrap" a ]) cfg.bootstrap
    ++ concatMap (k: [ "--trusted-key" k ]) cfg.trustedKeys
    ++ concatMap (p: [ "--deny" p ]) cfg.deny
    ++ optionals (cfg.settings != { }) [ "--config" "${settingsFile}" ];

  # `peerix seed` asks the running daemon; the settings matter only when it does the work itself.
  seedArgs =
    [ "seed" "--state-dir" cfg.stateDir ]
    ++ [ "--upstream-cache" (if cfg.upstreamCache == null then "none" else cfg.upstreamCache) ]
    ++ optional cfg.shareAll "--share-all"
    ++ optional cfg.seedSharePrivatePaths "--share-private-paths"
    ++ optionals (cfg.privateKeyFile != null) [ "--private-key" "%d/peerix.sec" ]
    ++ concatMap (k: [ "--trusted-key" k ]) cfg.trustedKeys
    ++ concatMap (p: [ "--deny" p ]) cfg.deny
    ++ optionals (cfg.settings != { }) [ "--config" "${settingsFile}" ]
    ++ concatMap (p: [ "--closure-of" p ]) cfg.seed;

  # A secret given as a Nix path (`./peerix.sec`) is copied into the world-readable store, where
  # every local user can read it and a seed of the closure would offer it to peers. `toString`
  # keeps a path's own location without copying it.
  notInStore = opt: value: {
    assertion = value == null || !(builtins.isPath value || lib.hasPrefix "${builtins.storeDir}/" (toString value));
    message = ''
      services.peerix.${opt} is ${if builtins.isPath value then "a Nix path" else "in the Nix store"} (${toString value}).
      A Nix path is copied into the Nix store; anything there is readable by everyone on the
      machine, and a seed of the system's closure would hand the key to peers. Give the file's
      location on the machine as a string instead, and keep the file out of the configuration:
        services.peerix.${opt} = "/var/lib/peerix-keys/${if opt == "privateKeyFile" then "peerix.sec" else "swarm.key"}";
    '';
  };

  # The Iroh-based peerix's `trackerUrl` named an HTTP tracker; the nearest thing peerix has is
  # a peer to connect to first. `https://tracker.lan:12305/peerix` becomes `tracker.lan:12305`
  # (a host without a port gets p2pPort).
  trackerPeer = url:
    let
      noScheme = lib.last (lib.splitString "://" url);
      hostPort = lib.head (lib.splitString "/" noScheme);
    in
    lib.optional (url != null && hostPort != "") hostPort;

  ownPublicKeys =
    optional (cfg.publicKey != null) cfg.publicKey
    ++ optional (cfg.publicKeyFile != null) (lib.removeSuffix "\n" (builtins.readFile cfg.publicKeyFile));
in
{
  imports =
    let
      old = name: [ "services" "peerix" name ];
    in
    [
      (lib.mkChangedOptionModule (old "trackerUrl") (old "extraHosts")
        (c: trackerPeer c.services.peerix.trackerUrl))
      # "nixpkgs" shared what cache.nixos.org has: peerix's default. "rules" shared everything
      # but what heuristics called system-specific: shareAll, with peerix's deny list (always on).
      (lib.mkChangedOptionModule (old "filterMode") (old "shareAll")
        (c: lib.mkIf (c.services.peerix.filterMode == "rules") true))
      (lib.mkRenamedOptionModule (old "filterConcurrency") (old "upstreamConcurrency"))
      # Serve every package, unfiltered: shareAll (deny patterns still win).
      (lib.mkChangedOptionModule (old "noFilter") (old "shareAll")
        (c: lib.mkIf c.services.peerix.noFilter true))
      # LAN discovery on top of the tracker: mDNS, which peerix runs unless disableBroadcast.
      (lib.mkChangedOptionModule (old "lanDiscovery") (old "disableBroadcast")
        (c: !c.services.peerix.lanDiscovery))
    ];

  options.services.peerix = {
    # The Iroh-based peerix's switches that peerix has no use for. Kept (hidden) so that a
    # configuration that sets them still switches; setting them (to anything) only warns.
    noVerify = mkOption {
      type = types.bool;
      default = false;
      visible = false;
      description = "Iroh-based peerix only; peerix always verifies. Has no effect.";
    };

    allowInsecureHttp = mkOption {
      type = types.bool;
      default = false;
      visible = false;
      description = "Iroh-based peerix only; nothing in peerix needs it. Has no effect.";
    };

    enable = mkEnableOption "peerix, a peer-to-peer binary cache for Nix";

    package = mkOption {
      type = types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.peerix;
      defaultText = lib.literalExpression "peerix.packages.\${system}.peerix";
      description = "The peerix package to run.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      description = "Open the peer port (TCP and QUIC) and, unless broadcast is disabled, mDNS.";
    };

    user = mkOption {
      type = types.str;
      default = "peerix";
      description = "User the daemon runs as (created when left at the default).";
    };

    group = mkOption {
      type = types.str;
      default = "peerix";
      description = "Group the daemon runs as (created when left at the default).";
    };

    privateKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/var/lib/peerix-keys/peerix.sec";
      description = ''
        Nix secret key (`nix-store --generate-binary-cache-key`) that peerix signs with: paths
        signed by it are shared with peers, and what peerix hands the local Nix is re-signed
        with it. Loaded as a systemd credential. Give it as a string (`"/var/lib/…/peerix.sec"`);
        a Nix path (`./peerix.sec`) would copy the key into the Nix store, so it is refused.
      '';
    };

    publicKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "File with the public half of privateKeyFile, added to the local Nix's trusted keys.";
    };

    publicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "host-1:MWaFkq1I…=";
      description = "The public half of privateKeyFile, added to the local Nix's trusted keys.";
    };

    extraHosts = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "builder.lan" "10.0.0.7:12305" "/ip4/10.0.0.8/tcp/12305" ];
      description = "Peers to connect to directly (host, host:port or multiaddr), for networks without broadcast such as VPNs.";
    };

    bootstrap = mkOption {
      type = types.listOf (types.strMatching ".*/p2p/[^/]+");
      default = [ ];
      example = [ "/dns4/dht.example.org/tcp/12305/p2p/12D3KooWExampleExampleExampleExampleExampleExample" ];
      description = "Entry points into the DHT, multiaddrs ending in /p2p/<peer id>: dialled at start and kept in the DHT's routing table, not held connected as extraHosts are.";
    };

    disableBroadcast = mkOption {
      type = types.bool;
      default = false;
      description = "Do not discover peers on the LAN (mDNS).";
    };

    priority = mkOption {
      type = types.int;
      default = 30;
      description = "Binary-cache priority announced to Nix (lower wins; cache.nixos.org is 40).";
    };

    timeout = mkOption {
      type = types.either types.int types.float;
      default = 2;
      description = "Seconds a lookup among peers may take before Nix is told the path is not here.";
    };

    upstreamCache = mkOption {
      type = types.nullOr types.str;
      default = "https://cache.nixos.org";
      description = "Upstream cache whose NarHashes make a path public (shareable) and a peer's answer trustworthy; null to disable.";
    };

    scanInterval = mkOption {
      type = types.ints.unsigned;
      default = 600;
      description = "Seconds between scans of the local store for paths to share; 0 scans once at start (and after each seed), with no periodic rescans.";
    };

    upstreamConcurrency = mkOption {
      type = types.ints.positive;
      default = 8;
      description = "Questions to the upstream cache in flight at once during a scan (the Iroh-based peerix's filterConcurrency).";
    };

    globalCacheTTL = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = null;
      description = "Seconds the local Nix remembers narinfos, found or not (narinfo-cache-positive-ttl and -negative-ttl); null leaves Nix's positive TTL alone and sets the negative one to 60.";
    };

    port = mkOption {
      type = types.port;
      default = 12304;
      description = "Port of the Nix-side HTTP endpoint (always on 127.0.0.1).";
    };

    p2pPort = mkOption {
      type = types.port;
      default = 12305;
      description = "Port peers connect to (TCP and QUIC).";
    };

    trustedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "builder-1:4v0cQ…=" ];
      description = "Public keys whose signatures are accepted from peers.";
    };

    seed = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/run/current-system" ];
      description = ''
        Closures to pin and keep serving to peers (`peerix seed --closure-of`). Of each closure
        only what is public or vouched for is seeded: paths whose NarHash the upstream cache has,
        and paths signed by privateKeyFile's key or one of trustedKeys. The rest (a system's own
        configuration, and any secret in it that no deny pattern names) is left out unless
        seedSharePrivatePaths is set.
      '';
    };

    seedSharePrivatePaths = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Let `seed` also share the paths of its closures that are neither in the upstream cache
        nor signed by a trusted key (`peerix seed --share-private-paths`): every peer that asks
        gets them. For closures you build to share; not for a system closure, whose
        configuration is in such paths. Deny patterns still win.
      '';
    };

    swarmKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/var/lib/peerix-keys/swarm.key";
      description = ''
        Pre-shared key that makes a private swarm (TCP only); nodes without it cannot connect.
        Give it as a string; a Nix path would copy the key into the Nix store, so it is refused.
      '';
    };

    maxStoreSize = mkOption {
      type = types.str;
      default = "10GiB";
      example = "50GB";
      description = "Disk budget for NARs kept in the state directory's packs (downloads the Nix store does not hold, pinned seeds); least recently used unpinned ones are evicted past it. \"0\" means no budget.";
    };

    maxUploadRate = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "2MiB";
      description = "Chunk bytes per second sent to peers beyond the LAN, shared fairly between them (a home uplink's polite share); null: no cap. Peers on the LAN are spared unless capLanUploads is set.";
    };

    capLanUploads = mkOption {
      type = types.bool;
      default = false;
      description = "Hold peers on the LAN (a direct connection from a private address) to maxUploadRate too; by default only peers beyond it are paced.";
    };

    relay = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Relay for peers behind NAT until they punch a hole to each other. Only a node that peers have confirmed to be reachable relays, and within the limits below.";
      };
      maxCircuits = mkOption {
        type = types.ints.positive;
        default = 16;
        description = "Circuits relayed at once, for all peers.";
      };
      maxCircuitBytes = mkOption {
        type = types.str;
        default = "8MiB";
        description = "Bytes one relayed circuit may carry before the relay ends it.";
      };
      maxCircuitDuration = mkOption {
        type = types.ints.positive;
        default = 120;
        description = "Seconds one relayed circuit may last.";
      };
    };

    wireCompression = mkOption {
      type = types.enum [ "auto" "always" "never" ];
      default = "auto";
      description = "How chunks are asked to come from peers: \"auto\" asks for zstd while a peer's link is slower than compression (raw on a fast LAN), \"always\" or \"never\".";
    };

    deltas = mkOption {
      type = types.bool;
      default = true;
      description = "Ask peers to send a changed chunk as a delta against an older version of the path this machine holds (far fewer bytes on an update; costs the sending peer CPU).";
    };

    shareAll = mkOption {
      type = types.bool;
      default = false;
      description = "Share every path in the store that no deny pattern matches, not only public, own-signed and pinned ones.";
    };

    deny = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "*-my-secret-config" ];
      description = "Extra store-path name globs never shared (added to peerix's built-in list).";
    };

    stateDir = mkOption {
      type = types.path;
      default = "/var/lib/peerix";
      description = "Where peerix keeps its identity and chunk store.";
    };

    settings = mkOption {
      type = (pkgs.formats.toml { }).type;
      default = { };
      description = "Extra settings written to peerix's TOML config file (keys as the flags, without the dashes).";
    };
  };

  config = mkIf cfg.enable {
    warnings =
      optional (options.services.peerix.noVerify.highestPrio < 1500) ''
        services.peerix.noVerify has no effect and can go: peerix always verifies what it hands
        Nix (a narinfo must carry a signature by one of trustedKeys or match the upstream
        cache's NarHash, and every chunk and the whole NAR are checked). To take a peer's own
        builds, add the key it signs with to services.peerix.trustedKeys.''
      ++ optional (options.services.peerix.allowInsecureHttp.highestPrio < 1500) ''
        services.peerix.allowInsecureHttp has no effect and can go: peerix has no tracker, peers
        talk over encrypted libp2p connections, and upstreamCache takes an http:// URL as given.'';
    assertions = [
      (notInStore "privateKeyFile" cfg.privateKeyFile)
      (notInStore "swarmKeyFile" cfg.swarmKeyFile)
    ];

    users.users = mkIf (cfg.user == "peerix") {
      peerix = {
        isSystemUser = true;
        group = cfg.group;
        home = cfg.stateDir;
      };
    };
    users.groups = mkIf (cfg.group == "peerix") { peerix = { }; };

    # StateDirectory= only makes directories under /var/lib; another state directory is made
    # here, owned by the daemon's user.
    systemd.tmpfiles.rules = mkIf (cfg.stateDir != "/var/lib/peerix") [
      "d ${cfg.stateDir} 0700 ${cfg.user} ${cfg.group} -"
    ];

    systemd.services.peerix = {
      description = "peerix, a peer-to-peer binary cache for Nix";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      serviceConfig = {
        ExecStart = lib.escapeShellArgs ([ (lib.getExe cfg.package) ] ++ args);
        User = cfg.user;
        Group = cfg.group;
        Restart = "on-failure";
        RestartSec = 5;
        StateDirectory = mkIf (cfg.stateDir == "/var/lib/peerix") "peerix";
        StateDirectoryMode = "0700";
        LoadCredential =
          optional (cfg.privateKeyFile != null) "peerix.sec:${toString cfg.privateKeyFile}"
          ++ optional (cfg.swarmKeyFile != null) "swarm.key:${toString cfg.swarmKeyFile}";
        # The store is read, never written.
        ReadOnlyPaths = [ "/nix/store" "/nix/var/nix/db" ];
        # ProtectSystem=strict leaves everything read-only but StateDirectory: a state directory
        # elsewhere must be made writable (and exist, see tmpfiles below).
        ReadWritePaths = mkIf (cfg.stateDir != "/var/lib/peerix") [ cfg.stateDir ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        # Netlink: interface discovery for mDNS and listening on all addresses.
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" "AF_NETLINK" ];
        SystemCallArchitectures = "native";
        CapabilityBoundingSet = "";
      };
    };

    systemd.services.peerix-seed = mkIf (cfg.seed != [ ]) {
      description = "Pin closures for peerix to keep serving";
      wantedBy = [ "multi-user.target" ];
      after = [ "peerix.service" ];
      requires = [ "peerix.service" ];
      # Seeding again is cheap (what is pinned stays pinned) and moves a link such as
      # /run/current-system to the generation it points at now, releasing the old one.
      startAt = "hourly";
      serviceConfig = {
        Type = "oneshot";
        ExecStart = lib.escapeShellArgs ([ (lib.getExe cfg.package) ] ++ seedArgs);
        User = cfg.user;
        Group = cfg.group;
        LoadCredential = optional (cfg.privateKeyFile != null) "peerix.sec:${toString cfg.privateKeyFile}";
        ReadOnlyPaths = [ "/nix/store" "/nix/var/nix/db" ];
        ReadWritePaths = [ cfg.stateDir ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        CapabilityBoundingSet = "";
      };
    };

    nix.settings = {
      extra-substituters = [ "http://127.0.0.1:${toString cfg.port}" ];
      extra-trusted-public-keys = ownPublicKeys ++ cfg.trustedKeys;
      # A peer that is gone must not stall Nix: fail fast, then use the next substituter.
      connect-timeout = lib.mkDefault 5;
      fallback = lib.mkDefault true;
      # A path a peer did not have a minute ago may be there now.
      narinfo-cache-negative-ttl =
        if cfg.globalCacheTTL == null then lib.mkDefault 60 else cfg.globalCacheTTL;
    } // lib.optionalAttrs (cfg.globalCacheTTL != null) {
      narinfo-cache-positive-ttl = cfg.globalCacheTTL;
    };

    networking.firewall = mkIf cfg.openFirewall {
      allowedTCPPorts = [ cfg.p2pPort ];
      allowedUDPPorts = [ cfg.p2pPort ] ++ optional (!cfg.disableBroadcast) 5353;
    };
  };
}
