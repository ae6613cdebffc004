{{/*
Named templates of the reditus-sidecar chart.

Every define takes this chart's root context: "." inside this chart. A chart that declares
this one as a dependency passes the subchart's context, which carries the subchart's own
values (with defaults), .Chart and .Release (see README.md, "Embedding the sidecar"):

  {{- $rs := index .Subcharts "reditus-sidecar" }}
  initContainers:
    {{- include "reditus-sidecar.container" $rs | nindent 8 }}
*/}}

{{/*
reditus-sidecar.name: the chart name, or nameOverride; the app.kubernetes.io/name label.
Truncated to 63 characters (the DNS label limit).
*/}}
{{- define "reditus-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
reditus-sidecar.fullname: base name of every resource. fullnameOverride wins; otherwise
"<release>-<name>", or the release name alone when it already contains the name.
*/}}
{{- define "reditus-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.chart: "<chart>-<version>" for the helm.sh/chart label (never a selector).
*/}}
{{- define "reditus-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name (.Chart.Version | default "0") | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
reditus-sidecar.selectorLabels: the immutable labels Deployment, Service, PodMonitor,
NetworkPolicy and PDB select on: app.kubernetes.io/name and instance only.
*/}}
{{- define "reditus-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reditus-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
reditus-sidecar.testSelectorLabels: labels of the helm test pod, deliberately different
from selectorLabels so that no ReplicaSet, Service or PDB of the release selects it; the
NetworkPolicy admits it by these labels.
*/}}
{{- define "reditus-sidecar.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "reditus-sidecar.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
reditus-sidecar.labels: the full label set of every resource: selector labels plus
version, chart, managed-by, part-of and commonLabels.
*/}}
{{- define "reditus-sidecar.labels" -}}
helm.sh/chart: {{ include "reditus-sidecar.chart" . }}
{{ include "reditus-sidecar.selectorLabels" . }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
app.kubernetes.io/part-of: reditus-sidecar
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.serviceAccountName: the ServiceAccount the pod runs as: the created one
(named after the release unless serviceAccount.name is set), or an existing one.
*/}}
{{- define "reditus-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reditus-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.image: the sidecar image reference: [registry/]repository, then
@digest when set, else :tag (default: the chart's appVersion).
*/}}
{{- define "reditus-sidecar.image" -}}
{{- $img := .Values.sidecar.image }}
{{- $repo := $img.repository }}
{{- if $img.registry }}
{{- $repo = printf "%s/%s" $img.registry $img.repository }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo (toString (default .Chart.AppVersion $img.tag)) }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.shutdownDelay: the effective sidecar.shutdownDelay in seconds, as a string
(wrap in int). An explicit value wins; null means 5 in container mode (the app and the
sidecar get SIGTERM together, the app may still need tokens) and 0 in native mode (the
kubelet stops the sidecar after the app).
*/}}
{{- /* Seconds the sidecar may need after the delay: its 10 s drain, plus up to 3 s to revoke
its Vault token (sidecar.vault.revokeOnShutdown) when it talks to Vault. */}}
{{- define "reditus-sidecar.stopBudget" -}}
{{- $revokes := and (has .Values.sidecar.source (list "vault" "transit")) (ne (toString .Values.sidecar.vault.revokeOnShutdown) "false") -}}
{{- ternary 13 10 $revokes -}}
{{- end }}

{{- define "reditus-sidecar.shutdownDelay" -}}
{{- $delay := .Values.sidecar.shutdownDelay -}}
{{- if kindIs "invalid" $delay -}}
{{- ternary 5 0 (eq .Values.sidecar.mode "container") -}}
{{- else -}}
{{- int $delay -}}
{{- end -}}
{{- end }}

{{/*
reditus-sidecar.validate: fails rendering on combinations that cannot work (the schema
checks single values; this checks how they fit together). Returns nothing otherwise.
*/}}
{{- define "reditus-sidecar.validate" -}}
{{- $sc := .Values.sidecar -}}
{{- if and (eq $sc.mode "native") .Capabilities (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "sidecar.mode=native needs Kubernetes >= 1.29 (native sidecar containers); this cluster is %s: set sidecar.mode=container" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- /* The grace period check needs this chart's pod; an embedding chart owns its own. */}}
{{- $delay := int (include "reditus-sidecar.shutdownDelay" .) }}
{{- $grace := int .Values.deployment.terminationGracePeriodSeconds }}
{{- $budget := int (include "reditus-sidecar.stopBudget" .) }}
{{- if and .Values.deployment.enabled (gt $delay 0) (le $grace (add $delay $budget)) }}
{{- $why := ternary (printf "%d, the default in container mode" $delay) (toString $delay) (kindIs "invalid" $sc.shutdownDelay) }}
{{- $after := ternary "10 s (its drain of in-flight signing requests) + 3 s (revoking its Vault token, sidecar.vault.revokeOnShutdown)" "10 s (its drain of in-flight signing requests)" (eq $budget 13) }}
{{- fail (printf "deployment.terminationGracePeriodSeconds (%d) must be greater than sidecar.shutdownDelay (%s) + %s, or the kubelet kills the sidecar before it has drained: raise terminationGracePeriodSeconds (e.g. to %d) or lower sidecar.shutdownDelay (0 turns the delay off)" $grace $why $after (add $delay $budget 5)) }}
{{- end }}
{{- if and (gt (int $sc.maxStaleness) 0) (lt (int $sc.maxStaleness) (int $sc.refreshInterval)) }}
{{- fail (printf "sidecar.maxStaleness (%d) must be 0 (off) or at least sidecar.refreshInterval (%d): the sidecar refuses to start otherwise" (int $sc.maxStaleness) (int $sc.refreshInterval)) }}
{{- end }}
{{- if and (eq $sc.source "transit") (not $sc.transit.productId) }}
{{- fail "sidecar.transit.productId (the product id from the Reditus dashboard) is required when sidecar.source is transit: the transit key holds only the secret" }}
{{- end }}
{{- if has $sc.source (list "vault" "transit") }}
{{- $auth := $sc.vault.auth }}
{{- if and (has $auth.method (list "kubernetes" "jwt")) (not $auth.role) }}
{{- fail (printf "sidecar.vault.auth.role is required for the %s auth method" $auth.method) }}
{{- end }}
{{- if eq $auth.method "approle" }}
{{- if not $auth.approle.roleId }}
{{- fail "sidecar.vault.auth.approle.roleId is required for the approle auth method" }}
{{- end }}
{{- if not $auth.approle.secretIdSecret.name }}
{{- fail "sidecar.vault.auth.approle.secretIdSecret.name (an existing Secret with the secret-id) is required for the approle auth method" }}
{{- end }}
{{- end }}
{{- if and (eq $auth.method "token") (not $auth.token.secret.name) (not $auth.token.file) }}
{{- fail "the token auth method needs sidecar.vault.auth.token.secret.name or sidecar.vault.auth.token.file" }}
{{- end }}
{{- if and $sc.vault.caCert.configMap $sc.vault.caCert.secret }}
{{- fail "set only one of sidecar.vault.caCert.configMap and sidecar.vault.caCert.secret" }}
{{- end }}
{{- if and (eq $auth.method "cert") (not $sc.vault.tls.clientCertSecret) }}
{{- fail "the cert auth method needs sidecar.vault.tls.clientCertSecret (a kubernetes.io/tls Secret with the client certificate and key)" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.env: the sidecar's environment (list of EnvVar), one variable per
documented setting of the README; Vault settings only when the source is vault or transit
(KV location for vault, transit key and product id for transit), the
shutdown delay only when it is on.
*/}}
{{- define "reditus-sidecar.env" -}}
{{- $sc := .Values.sidecar -}}
{{- $uids := include "reditus-sidecar.allowedUids" . }}
{{- $gids := include "reditus-sidecar.allowedGids" . }}
- name: REDITUS_SIDECAR_LISTEN
  value: {{ ternary "off" $sc.listen (or (ne $uids "") (ne $gids "")) | quote }}
- name: REDITUS_SIDECAR_METRICS_LISTEN
  value: {{ printf "%s:%d" (ternary (printf "[%s]" $sc.opsListenHost) $sc.opsListenHost (contains ":" $sc.opsListenHost)) (int $sc.opsPort) | quote }}
{{- if $sc.unixSocket.enabled }}
- name: REDITUS_SIDECAR_UNIX_SOCKET
  value: {{ printf "%s/%s" $sc.unixSocket.dir $sc.unixSocket.name | quote }}
{{- end }}
{{- with $uids }}
- name: REDITUS_SIDECAR_ALLOWED_UIDS
  value: {{ . | quote }}
{{- end }}
{{- with $gids }}
- name: REDITUS_SIDECAR_ALLOWED_GIDS
  value: {{ . | quote }}
{{- end }}
- name: REDITUS_SIDECAR_AUDIT
  value: {{ $sc.audit.target | quote }}
{{- if ne $sc.audit.target "off" }}
- name: REDITUS_SIDECAR_AUDIT_FAIL
  value: {{ $sc.audit.fail | quote }}
{{- if $sc.audit.keySecret.name }}
- name: REDITUS_SIDECAR_AUDIT_KEY_FILE
  value: {{ printf "%s/key" $sc.audit.keyMountPath | quote }}
{{- end }}
{{- end }}
- name: REDITUS_SIDECAR_SECRET_SOURCE
  value: {{ $sc.source | quote }}
{{- if eq $sc.source "file" }}
- name: REDITUS_SIDECAR_SECRET_FILE
  value: {{ $sc.file.path | quote }}
{{- else }}
{{- $v := $sc.vault }}
{{- if $v.addressFrom }}
- name: VAULT_ADDR
  valueFrom:
    {{- toYaml $v.addressFrom | nindent 4 }}
{{- else if $v.address }}
- name: VAULT_ADDR
  value: {{ $v.address | quote }}
{{- end }}
{{- with $v.namespace }}
- name: VAULT_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- if or $v.caCert.configMap $v.caCert.secret }}
- name: VAULT_CACERT
  value: /etc/reditus-sidecar/vault-ca/ca.crt
{{- end }}
{{- if $v.caPathConfigMap }}
- name: VAULT_CAPATH
  value: /etc/reditus-sidecar/vault-capath
{{- end }}
{{- if $v.tls.clientCertSecret }}
- name: VAULT_CLIENT_CERT
  value: {{ printf "%s/tls.crt" $v.tls.mountPath | quote }}
- name: VAULT_CLIENT_KEY
  value: {{ printf "%s/tls.key" $v.tls.mountPath | quote }}
{{- end }}
{{- with $v.tls.serverName }}
- name: VAULT_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
- name: REDITUS_SIDECAR_VAULT_AUTH
  value: {{ $v.auth.method | quote }}
{{- with $v.auth.mount }}
- name: REDITUS_SIDECAR_VAULT_AUTH_MOUNT
  value: {{ . | quote }}
{{- end }}
{{- if has $v.auth.method (list "kubernetes" "jwt") }}
- name: REDITUS_SIDECAR_VAULT_ROLE
  value: {{ $v.auth.role | quote }}
- name: REDITUS_SIDECAR_VAULT_JWT_FILE
  value: {{ printf "%s/token" $v.auth.serviceAccountToken.mountPath | quote }}
{{- else if eq $v.auth.method "approle" }}
- name: REDITUS_SIDECAR_VAULT_ROLE_ID
  value: {{ $v.auth.approle.roleId | quote }}
- name: REDITUS_SIDECAR_VAULT_SECRET_ID_FILE
  value: {{ printf "%s/secret-id" $v.auth.approle.mountPath | quote }}
{{- else if eq $v.auth.method "token" }}
- name: REDITUS_SIDECAR_VAULT_TOKEN_FILE
  value: {{ ternary (printf "%s/token" $v.auth.token.mountPath) $v.auth.token.file (not (empty $v.auth.token.secret.name)) | quote }}
{{- else if and (eq $v.auth.method "cert") $v.auth.role }}
- name: REDITUS_SIDECAR_VAULT_ROLE
  value: {{ $v.auth.role | quote }}
{{- end }}
- name: REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN
  value: {{ $v.revokeOnShutdown | toString | quote }}
{{- if eq $sc.source "transit" }}
- name: REDITUS_SIDECAR_TRANSIT_MOUNT
  value: {{ $sc.transit.mount | quote }}
- name: REDITUS_SIDECAR_TRANSIT_KEY
  value: {{ $sc.transit.key | quote }}
- name: REDITUS_SIDECAR_PRODUCT_ID
  value: {{ $sc.transit.productId | quote }}
{{- else }}
- name: REDITUS_SIDECAR_KV_MOUNT
  value: {{ $v.kv.mount | quote }}
- name: REDITUS_SIDECAR_KV_PATH
  value: {{ $v.kv.path | quote }}
- name: REDITUS_SIDECAR_PRODUCT_ID_KEY
  value: {{ $v.kv.productIdKey | quote }}
- name: REDITUS_SIDECAR_SECRET_KEY
  value: {{ $v.kv.secretKey | quote }}
{{- end }}
{{- end }}
- name: REDITUS_SIDECAR_REFRESH_INTERVAL
  value: {{ $sc.refreshInterval | toString | quote }}
- name: REDITUS_SIDECAR_BACKOFF_MAX
  value: {{ $sc.backoffMax | toString | quote }}
- name: REDITUS_SIDECAR_MAX_STALENESS
  value: {{ $sc.maxStaleness | toString | quote }}
- name: REDITUS_SIDECAR_REQUIRE_HEADER
  value: {{ $sc.requireHeader | toString | quote }}
- name: REDITUS_SIDECAR_TOKEN_TTL
  value: {{ $sc.tokenTTL | toString | quote }}
- name: REDITUS_SIDECAR_LOG_LEVEL
  value: {{ $sc.logLevel | quote }}
- name: REDITUS_SIDECAR_LOG_FORMAT
  value: {{ $sc.logFormat | quote }}
{{- $delay := int (include "reditus-sidecar.shutdownDelay" .) }}
{{- if gt $delay 0 }}
- name: REDITUS_SIDECAR_SHUTDOWN_DELAY
  value: {{ $delay | toString | quote }}
{{- end }}
{{- with $sc.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.volumeMounts: the sidecar's mounts: writable /tmp, then the credential
files its auth method needs, the Vault CA, the socket directory and extraVolumeMounts.
*/}}
{{- define "reditus-sidecar.volumeMounts" -}}
{{- $sc := .Values.sidecar -}}
- name: reditus-sidecar-tmp
  mountPath: /tmp
{{- if has $sc.source (list "vault" "transit") }}
{{- $auth := $sc.vault.auth }}
{{- if has $auth.method (list "kubernetes" "jwt") }}
- name: reditus-sidecar-sa-token
  mountPath: {{ $auth.serviceAccountToken.mountPath }}
  readOnly: true
{{- else if eq $auth.method "approle" }}
- name: reditus-sidecar-approle
  mountPath: {{ $auth.approle.mountPath }}
  readOnly: true
{{- else if and (eq $auth.method "token") $auth.token.secret.name }}
- name: reditus-sidecar-vault-token
  mountPath: {{ $auth.token.mountPath }}
  readOnly: true
{{- end }}
{{- if or $sc.vault.caCert.configMap $sc.vault.caCert.secret }}
- name: reditus-sidecar-vault-ca
  mountPath: /etc/reditus-sidecar/vault-ca
  readOnly: true
{{- end }}
{{- if $sc.vault.caPathConfigMap }}
- name: reditus-sidecar-vault-capath
  mountPath: /etc/reditus-sidecar/vault-capath
  readOnly: true
{{- end }}
{{- if $sc.vault.tls.clientCertSecret }}
- name: reditus-sidecar-vault-tls
  mountPath: {{ $sc.vault.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}
{{- if $sc.unixSocket.enabled }}
- name: reditus-sidecar-socket
  mountPath: {{ $sc.unixSocket.dir }}
{{- end }}
{{- if and (ne $sc.audit.target "off") $sc.audit.keySecret.name }}
- name: reditus-sidecar-audit-key
  mountPath: {{ $sc.audit.keyMountPath }}
  readOnly: true
{{- end }}
{{- with $sc.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.volumes: the pod volumes the sidecar container mounts (list of Volume).
Include it in the pod's volumes next to your own when embedding the sidecar.
*/}}
{{- define "reditus-sidecar.volumes" -}}
{{- $sc := .Values.sidecar -}}
- name: reditus-sidecar-tmp
  emptyDir:
    medium: Memory
    sizeLimit: {{ $sc.tmpSizeLimit }}
{{- if has $sc.source (list "vault" "transit") }}
{{- $auth := $sc.vault.auth }}
{{- if has $auth.method (list "kubernetes" "jwt") }}
- name: reditus-sidecar-sa-token
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken:
          audience: {{ $auth.serviceAccountToken.audience | quote }}
          expirationSeconds: {{ int $auth.serviceAccountToken.expirationSeconds }}
          path: token
{{- else if eq $auth.method "approle" }}
- name: reditus-sidecar-approle
  secret:
    secretName: {{ $auth.approle.secretIdSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $auth.approle.secretIdSecret.key }}
        path: secret-id
{{- else if and (eq $auth.method "token") $auth.token.secret.name }}
- name: reditus-sidecar-vault-token
  secret:
    secretName: {{ $auth.token.secret.name }}
    defaultMode: 0440
    items:
      - key: {{ $auth.token.secret.key }}
        path: token
{{- end }}
{{- with $sc.vault.caCert }}
{{- if .configMap }}
- name: reditus-sidecar-vault-ca
  configMap:
    name: {{ .configMap }}
    items:
      - key: {{ .key }}
        path: ca.crt
{{- else if .secret }}
- name: reditus-sidecar-vault-ca
  secret:
    secretName: {{ .secret }}
    defaultMode: 0444
    items:
      - key: {{ .key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- with $sc.vault.caPathConfigMap }}
- name: reditus-sidecar-vault-capath
  configMap:
    name: {{ . }}
{{- end }}
{{- with $sc.vault.tls.clientCertSecret }}
{{- /* the whole Secret as a directory (no subPath): the kubelet's ..data swap reaches the pod */}}
- name: reditus-sidecar-vault-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- if $sc.unixSocket.enabled }}
- name: reditus-sidecar-socket
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- if and (ne $sc.audit.target "off") $sc.audit.keySecret.name }}
- name: reditus-sidecar-audit-key
  secret:
    secretName: {{ $sc.audit.keySecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $sc.audit.keySecret.key }}
        path: key
{{- end }}
{{- end }}

{{/*
reditus-sidecar.allowedUids: the uids allowed to sign on the unix socket, comma-separated
(REDITUS_SIDECAR_ALLOWED_UIDS): the app container's runAsUser (its own securityContext,
else the pod's) when unixSocket.allowAppUser, plus unixSocket.allowedUids. Empty when the
socket is off or nothing is allowed (then no allow-list is set).
*/}}
{{- define "reditus-sidecar.allowedUids" -}}
{{- $us := .Values.sidecar.unixSocket -}}
{{- if $us.enabled }}
{{- $ids := list }}
{{- if $us.allowAppUser }}
{{- $app := .Values.app.securityContext | default dict }}
{{- $pod := .Values.deployment.podSecurityContext | default dict }}
{{- if hasKey $app "runAsUser" }}
{{- $ids = append $ids (int64 $app.runAsUser | toString) }}
{{- else if hasKey $pod "runAsUser" }}
{{- $ids = append $ids (int64 $pod.runAsUser | toString) }}
{{- else }}
{{- fail "sidecar.unixSocket.allowAppUser needs the app's uid: set app.securityContext.runAsUser (or deployment.podSecurityContext.runAsUser), or set allowAppUser to false and list the uids in sidecar.unixSocket.allowedUids" }}
{{- end }}
{{- end }}
{{- range $us.allowedUids }}
{{- $ids = append $ids (int64 . | toString) }}
{{- end }}
{{- $ids | uniq | join "," }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.allowedGids: unixSocket.allowedGids, comma-separated
(REDITUS_SIDECAR_ALLOWED_GIDS); empty when the socket is off or none is listed.
*/}}
{{- define "reditus-sidecar.allowedGids" -}}
{{- $us := .Values.sidecar.unixSocket -}}
{{- if $us.enabled }}
{{- $ids := list }}
{{- range $us.allowedGids }}
{{- $ids = append $ids (int64 . | toString) }}
{{- end }}
{{- $ids | uniq | join "," }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.probe: one HTTP probe on the ops port. Takes a dict with "path", "port"
and "probe" (periodSeconds, timeoutSeconds, failureThreshold).
*/}}
{{- define "reditus-sidecar.probe" -}}
httpGet:
  path: {{ .path }}
  port: ops
  scheme: HTTP
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/*
reditus-sidecar.container: the sidecar container (a single list item): image, args, env,
the ops port (the signing listener is loopback-only and never a containerPort), startup,
readiness and liveness probes, security context, resources and volume mounts.
With sidecar.mode "native" it carries restartPolicy: Always and belongs in the pod's
initContainers; with "container" it belongs in containers. Pair it with
"reditus-sidecar.volumes" in the pod's volumes.
*/}}
{{- define "reditus-sidecar.container" -}}
{{- include "reditus-sidecar.validate" . }}
{{- $sc := .Values.sidecar -}}
- name: {{ $sc.name }}
  image: {{ include "reditus-sidecar.image" . | quote }}
  imagePullPolicy: {{ $sc.image.pullPolicy }}
  {{- if eq $sc.mode "native" }}
  restartPolicy: Always
  {{- end }}
  {{- with $sc.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    {{- include "reditus-sidecar.env" . | nindent 4 }}
  ports:
    - name: ops
      containerPort: {{ int $sc.opsPort }}
      protocol: TCP
  startupProbe:
    {{- include "reditus-sidecar.probe" (dict "path" "/readyz" "probe" $sc.probes.startup) | nindent 4 }}
  readinessProbe:
    {{- include "reditus-sidecar.probe" (dict "path" "/readyz" "probe" $sc.probes.readiness) | nindent 4 }}
  livenessProbe:
    {{- include "reditus-sidecar.probe" (dict "path" "/healthz" "probe" $sc.probes.liveness) | nindent 4 }}
  {{- with $sc.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "reditus-sidecar.volumeMounts" . | nindent 4 }}
{{- end }}

{{/*
reditus-sidecar.appEnv: environment for the app container (list of EnvVar) telling it
where to ask for tokens: REDITUS_SIDECAR_URL (left out while the socket's allow-list turns
TCP off), and REDITUS_SIDECAR_UNIX_SOCKET when the socket is on. The sidecar itself does
not read REDITUS_SIDECAR_URL.
*/}}
{{- define "reditus-sidecar.appEnv" -}}
{{- $sc := .Values.sidecar -}}
{{- $restricted := or (ne (include "reditus-sidecar.allowedUids" .) "") (ne (include "reditus-sidecar.allowedGids" .) "") }}
{{- if not $restricted }}
- name: REDITUS_SIDECAR_URL
  value: {{ printf "http://%s" $sc.listen | quote }}
{{- end }}
{{- if $sc.unixSocket.enabled }}
- name: REDITUS_SIDECAR_UNIX_SOCKET
  value: {{ printf "%s/%s" $sc.unixSocket.dir $sc.unixSocket.name | quote }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.appVolumeMounts: mounts the app container needs from the sidecar (the
socket directory when the unix socket is on); renders nothing otherwise.
*/}}
{{- define "reditus-sidecar.appVolumeMounts" -}}
{{- if .Values.sidecar.unixSocket.enabled }}
- name: reditus-sidecar-socket
  mountPath: {{ .Values.sidecar.unixSocket.dir }}
{{- end }}
{{- end }}

{{/*
reditus-sidecar.metricsServiceEnabled: "true" when the metrics Service is rendered
(asked for, or needed by the ServiceMonitor).
*/}}
{{- define "reditus-sidecar.metricsServiceEnabled" -}}
{{- if or .Values.metrics.service.enabled .Values.metrics.serviceMonitor.enabled }}true{{ end }}
{{- end }}

{{/*
reditus-sidecar.scrapeEndpoint: the one scrape endpoint (a list item) of the PodMonitor and
the ServiceMonitor: port ops, /metrics. Takes metrics.podMonitor or metrics.serviceMonitor.
*/}}
{{- define "reditus-sidecar.scrapeEndpoint" -}}
- port: ops
  path: /metrics
  interval: {{ .interval }}
  scrapeTimeout: {{ .scrapeTimeout }}
  {{- with .relabelings }}
  relabelings:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .metricRelabelings }}
  metricRelabelings:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
