"""kubectl apply --dry-run=client on manifests, against a stub of an API
server on loopback that answers kubectl's discovery and nothing else
(Debian's kubernetes-client; no cluster)."""

import json
import os
import shutil
import subprocess

import pytest


def stub_server():
    """Enough of an API server for kubectl's discovery (the kinds the
    examples use) and nothing else: every object is not found, so apply
    --dry-run=client reports what it would create.  Loopback only."""
    import http.server
    import threading

    def resources(gv, *kinds):
        return {"kind": "APIResourceList", "groupVersion": gv,
                "resources": [{"name": n, "singularName": "",
                               "namespaced": ns, "kind": k,
                               "verbs": ["create", "get", "list", "patch",
                                         "update", "delete"]}
                              for n, ns, k in kinds]}

    net = {"groupVersion": "networking.k8s.io/v1", "version": "v1"}
    answers = {
        "/api": {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [
                     {"clientCIDR": "0.0.0.0/0",
                      "serverAddress": "127.0.0.1"}]},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1",
                  "groups": [{"name": "networking.k8s.io", "versions": [net],
                              "preferredVersion": net}]},
        "/api/v1": resources("v1", ("configmaps", True, "ConfigMap"),
                             ("secrets", True, "Secret"),
                             ("namespaces", False, "Namespace")),
        "/apis/networking.k8s.io/v1": resources(
            "networking.k8s.io/v1", ("ingresses", True, "Ingress")),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = answers.get(self.path.split("?")[0])
            code = 200 if body else 404
            body = json.dumps(body or {
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404,
                "message": "not found"}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def kubectl_dry_run(files, tmp_path):
    """kubectl apply --dry-run=client --validate=false of files: its
    output, after asserting it succeeded (skips without kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian's kubernetes-client)")
    server = stub_server()
    try:
        kc = tmp_path / "kubeconfig"
        kc.write_text(
            "apiVersion: v1\nkind: Config\n"
            "clusters: [{name: stub, cluster: {server: "
            f"'http://127.0.0.1:{server.server_port}'}}}}]\n"
            "contexts: [{name: stub, context: {cluster: stub, user: stub}}]\n"
            "current-context: stub\nusers: [{name: stub, user: {}}]\n")
        args = [kubectl, "--kubeconfig", str(kc), "apply", "--dry-run=client",
                "--validate=false"]
        for f in files:
            args += ["-f", str(f)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, HOME=str(tmp_path)))
        assert r.returncode == 0, r.stderr
        return r.stdout
    finally:
        server.shutdown()
        server.server_close()
