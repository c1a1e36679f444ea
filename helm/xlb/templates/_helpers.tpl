{{/* Names and labels. */}}

{{- define "xlb.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "xlb.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "xlb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xlb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "xlb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "xlb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: load-balancer
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "xlb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "xlb.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "xlb.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) -}}
{{- end -}}

{{/* Where the preStop hook puts the file that starts XLB's shutdown. */}}
{{- define "xlb.shutdownFile" -}}
{{- default "/tmp/shutdown" .Values.config.shutdown_file -}}
{{- end -}}

{{/*
The xlb instance: config.name, else the name xlb reports as service.name in
its metrics when config.name is unset (the Kubernetes Service it balances,
else xlb), so setting it changes nothing else. It names the pin directory,
/sys/fs/bpf/xlb/<instance>/, the only part of the node's bpffs the pod mounts,
so the chart must know it when rendering (xlb's own default, xlb-<listen
address>, is known only on the node).
*/}}
{{- define "xlb.instance" -}}
{{- if .Values.config.name -}}
{{- .Values.config.name -}}
{{- else -}}
{{- $provider := include "xlb.provider" . | fromYaml -}}
{{- ($provider.kubernetes | default dict).service | default "xlb" -}}
{{- end -}}
{{- end -}}

{{- define "xlb.pinDir" -}}
{{- printf "/sys/fs/bpf/xlb/%s" (include "xlb.instance" .) -}}
{{- end -}}

{{/* The admin listener as the probes reach it: the node's loopback. */}}
{{- define "xlb.adminHost" -}}
{{- $admin := .Values.config.admin | default dict -}}
{{- if has (toString $admin.address) (list "::1" "::") -}}::1{{- else -}}127.0.0.1{{- end -}}
{{- end -}}

{{- define "xlb.adminPort" -}}
{{- $admin := .Values.config.admin | default dict -}}
{{- $admin.port | default 9090 | int -}}
{{- end -}}

{{- define "xlb.adminURL" -}}
{{- $host := include "xlb.adminHost" . -}}
{{- if eq $host "::1" -}}
http://[::1]:{{ include "xlb.adminPort" . }}
{{- else -}}
http://{{ $host }}:{{ include "xlb.adminPort" . }}
{{- end -}}
{{- end -}}

{{/*
The provider xlb gets: kubernetes when its service is set, else static.
values.yaml carries an empty kubernetes entry, so a user who gives
static.backends gets static without having to null the kubernetes entry.
On an upgrade that names no provider (`helm upgrade ... --set env.RUST_LOG=debug`
without --reuse-values starts from the chart's defaults), the release keeps
the provider its running xlb.yaml has, so changing a log level never
retargets the load balancer.
*/}}
{{- define "xlb.provider" -}}
{{- $provider := .Values.config.provider | default dict -}}
{{- $k8s := $provider.kubernetes | default dict -}}
{{- $static := $provider.static | default dict -}}
{{- $running := dict -}}
{{- $cm := lookup "v1" "ConfigMap" .Release.Namespace (include "xlb.fullname" .) -}}
{{- if and $cm $cm.data (index $cm.data "xlb.yaml") -}}
{{- $running = (index $cm.data "xlb.yaml" | fromYaml).provider | default dict -}}
{{- end -}}
{{- if and $k8s.service $static.backends -}}
{{- fail "xlb: config.provider has both kubernetes.service and static.backends; set exactly one" -}}
{{- else if $k8s.service -}}
{{- toYaml (dict "kubernetes" $k8s) -}}
{{- else if $static.backends -}}
{{- toYaml (dict "static" $static) -}}
{{- else if or $running.kubernetes $running.static -}}
{{- toYaml $running -}}
{{- else -}}
{{- fail "xlb: config.provider.kubernetes.service is required: the Service whose endpoints XLB balances (e.g. --set config.provider.kubernetes.service=my-backend-service); or give config.provider.static.backends" -}}
{{- end -}}
{{- end -}}

{{/*
Checks that need more than one value; values.schema.json checks each value on
its own. Every message names the values to change.
*/}}
{{- define "xlb.validate" -}}
{{- $cfg := .Values.config -}}
{{- $_ := include "xlb.provider" . -}}
{{- $timeout := 15 -}}
{{- if hasKey $cfg "shutdown_timeout" -}}
{{- $timeout = int $cfg.shutdown_timeout -}}
{{- end -}}
{{- $seccomp := .Values.seccompProfile | default dict -}}
{{- if and (eq (toString $seccomp.type) "Localhost") (not $seccomp.localhostProfile) -}}
{{- fail "xlb: seccompProfile.type Localhost needs seccompProfile.localhostProfile: the profile's path under the kubelet's seccomp directory on every node, e.g. xlb.json for /var/lib/kubelet/seccomp/xlb.json (README.md, \"Seccomp\")" -}}
{{- end -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if le $grace $timeout -}}
{{- fail (printf "xlb: terminationGracePeriodSeconds (%d) must be greater than config.shutdown_timeout (%d): the pod needs the whole RST phase plus time to exit, or Kubernetes kills it mid-drain" $grace $timeout) -}}
{{- end -}}
{{- end -}}

{{/*
The xlb.yaml the pod reads: config as given, minus empty optional values
(xlb refuses an empty `name` or `interfaces` list), with the chosen provider,
the instance name (its pin directory is what the pod mounts) and the shutdown
file the preStop hook creates.
*/}}
{{- define "xlb.config" -}}
{{- $out := dict -}}
{{- range $key, $value := .Values.config -}}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int" $value) (kindIs "int64" $value) $value -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out "provider" (include "xlb.provider" . | fromYaml) -}}
{{- $_ := set $out "name" (include "xlb.instance" .) -}}
{{- $_ := set $out "shutdown_file" (include "xlb.shutdownFile" .) -}}
{{- toYaml $out -}}
{{- end -}}
