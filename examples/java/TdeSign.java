// A signature with a private key that lives in the tde sidecar's HSM,
// through Java's own PKCS#11 provider (SunPKCS11) and libtde_pkcs11.so,
// verified outside the HSM with the certificate's public key.
//
//   javac TdeSign.java
//   TDE_PKCS11_SOCKET=/var/lib/tde/data.sock \
//     java TdeSign p11.cfg alice:PASSWORD signer SHA256withRSA
//
// p11.cfg:  name = tde
//           library = /usr/lib/tde/libtde_pkcs11.so
//           slot = 0
//
// The alias is a private key with a certificate of the same CKA_ID in the
// token (SunPKCS11 lists a private key only with its certificate). Prints
// one line per step.

import java.security.Key;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.Security;
import java.security.Signature;
import java.security.cert.X509Certificate;
import java.util.Collections;

public class TdeSign {
    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, args[1].toCharArray());
        System.out.println("aliases: " + Collections.list(ks.aliases()));
        Key key = ks.getKey(args[2], null);
        X509Certificate cert = (X509Certificate) ks.getCertificate(args[2]);
        System.out.println("key: " + key.getAlgorithm() + " " + (key instanceof PrivateKey));
        System.out.println("certificate: " + cert.getSubjectX500Principal());

        byte[] data = "the data to sign".getBytes("UTF-8");
        Signature signer = Signature.getInstance(args[3], p);
        signer.initSign((PrivateKey) key);
        signer.update(data);
        byte[] sig = signer.sign();
        System.out.println("signature: " + sig.length + " bytes by " + signer.getProvider().getName());

        // Outside the HSM: the JDK's own provider, the certificate's key.
        Signature verifier = Signature.getInstance(args[3]);
        for (Provider q : Security.getProviders()) {
            if (!q.getName().startsWith("SunPKCS11")) {
                try {
                    verifier = Signature.getInstance(args[3], q);
                    break;
                } catch (java.security.NoSuchAlgorithmException e) {
                    // not this one
                }
            }
        }
        verifier.initVerify(cert.getPublicKey());
        verifier.update(data);
        System.out.println("verified by " + verifier.getProvider().getName() + ": " + verifier.verify(sig));

        data[0] ^= 1;
        verifier.initVerify(cert.getPublicKey());
        verifier.update(data);
        System.out.println("changed data verified: " + verifier.verify(sig));
    }
}
