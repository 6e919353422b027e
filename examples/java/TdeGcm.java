// AES-256-GCM with a key that lives in the tde sidecar's HSM, through
// Java's own PKCS#11 provider (SunPKCS11) and libtde_pkcs11.so.
//
//   javac TdeGcm.java
//   TDE_PKCS11_SOCKET=/var/lib/tde/data.sock \
//     java TdeGcm p11.cfg alice:PASSWORD pg-main
//
// p11.cfg:  name = tde
//           library = /usr/lib/tde/libtde_pkcs11.so
//           slot = 0
//
// Prints one line per step; a tampered tag must throw AEADBadTagException.

import java.security.Key;
import java.security.KeyStore;
import java.security.Provider;
import java.security.SecureRandom;
import java.security.Security;
import java.util.Arrays;
import java.util.Collections;
import javax.crypto.AEADBadTagException;
import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;

public class TdeGcm {
    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, args[1].toCharArray());
        System.out.println("aliases: " + Collections.list(ks.aliases()));
        Key key = ks.getKey(args[2], null);
        System.out.println("key: " + key.getAlgorithm());

        byte[] iv = new byte[12];
        new SecureRandom().nextBytes(iv);
        byte[] aad = "table 42".getBytes("UTF-8");
        byte[] tableKey = new byte[32];
        new SecureRandom().nextBytes(tableKey);

        Cipher c = Cipher.getInstance("AES/GCM/NoPadding", p);
        c.init(Cipher.ENCRYPT_MODE, key, new GCMParameterSpec(128, iv));
        c.updateAAD(aad);
        byte[] sealed = c.doFinal(tableKey);
        System.out.println("sealed: " + sealed.length + " bytes");

        c.init(Cipher.DECRYPT_MODE, key, new GCMParameterSpec(128, iv));
        c.updateAAD(aad);
        byte[] opened = c.doFinal(sealed);
        System.out.println("opened: " + Arrays.equals(opened, tableKey));

        sealed[sealed.length - 1] ^= 1;
        c.init(Cipher.DECRYPT_MODE, key, new GCMParameterSpec(128, iv));
        c.updateAAD(aad);
        try {
            c.doFinal(sealed);
            System.out.println("tampered: accepted");
        } catch (AEADBadTagException e) {
            System.out.println("tampered: AEADBadTagException");
        }
    }
}
